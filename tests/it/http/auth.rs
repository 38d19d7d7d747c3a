//! API keys: which routes need which key, the 401 reply, keys from flags, variables, the config
//! file and keys files, and the safe-by-default listen check (also through the binary).

use std::process::Command;

use modelpool::config::{FileConfig, ServeConfig};

use super::config::args;
use modelpool::http::Auth;

use super::*;

const USER: &str = "sk-user-0123456789";
const ADMIN: &str = "sk-admin-0123456789";

fn keyed(public_metrics: bool) -> Harness {
    let key = |s: &str| s.parse().unwrap();
    Harness::new(10 * GB, 4)
        .with_state(|s| s.with_auth(Auth::new(&[key(USER)], &[key(ADMIN)], public_metrics)))
}

async fn call(h: &Harness, method: &str, path: &str, auth: Option<&str>) -> warp::http::Response<Bytes> {
    let mut r = warp::test::request().method(method).path(path);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    if method == "POST" {
        r = r
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&chat_body("chat-a", false)).unwrap());
    }
    r.reply(&h.routes).await
}

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

#[tokio::test]
async fn v1_needs_an_api_key_and_refuses_others_with_openais_401() {
    let h = keyed(false);
    for (auth, why) in [
        (None, "You didn't provide an API key"),
        (Some("Bearer wrong-key"), "Incorrect API key provided"),
        (Some("Basic dXNlcjpwYXNz"), "You didn't provide an API key"),
        (Some("Bearer"), "You didn't provide an API key"),
        (Some(&*format!("Bearer {USER}x")), "Incorrect API key provided"),
        (Some(&USER[..USER.len() - 1]), "You didn't provide an API key"),
    ] {
        for (method, path) in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nope")] {
            let r = call(&h, method, path, auth).await;
            let e = assert_error(&r, 401, "invalid_api_key");
            assert_eq!(e["type"], "invalid_request_error");
            let msg = e["message"].as_str().unwrap();
            assert!(msg.starts_with(why), "{auth:?} {path}: {msg}");
            // The presented key is never echoed.
            assert!(!msg.contains("wrong-key") && !msg.contains(USER), "{msg}");
            assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer");
        }
    }
    // Nothing reached the pool.
    assert_eq!(h.fake.load_count(), 0);
    assert_eq!(h.state.metrics.responses("auth", 401), 18);
    for key in [USER, ADMIN] {
        assert_eq!(call(&h, "GET", "/v1/models", Some(&bearer(key))).await.status(), 200);
        let r = call(&h, "POST", "/v1/chat/completions", Some(&bearer(key))).await;
        assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    }
    // The scheme is case-insensitive, as RFC 7235 says.
    assert_eq!(call(&h, "GET", "/v1/models", Some(&format!("bearer {USER}"))).await.status(), 200);
    // An unknown route under /v1 with a good key is still a 404.
    assert_error(&call(&h, "GET", "/v1/nope", Some(&bearer(USER))).await, 404, "not_found");
}

#[tokio::test]
async fn admin_and_metrics_need_the_admin_key_health_is_open() {
    let h = keyed(false);
    for path in ["/admin/pool", "/admin/models/chat-a", "/admin/events", "/metrics"] {
        assert_error(&call(&h, "GET", path, None).await, 401, "invalid_api_key");
        assert_error(&call(&h, "GET", path, Some(&bearer(USER))).await, 401, "invalid_api_key");
        let r = call(&h, "GET", path, Some(&bearer(ADMIN))).await;
        assert_eq!(r.status(), 200, "{path}: {}", String::from_utf8_lossy(r.body()));
    }
    // A mutating admin call with the user key changes nothing.
    h.post("/v1/chat/completions", chat_body("chat-a", false)).await;
    let r = warp::test::request()
        .method("POST")
        .path("/admin/models/chat-a/preload")
        .header("authorization", bearer(USER))
        .reply(&h.routes)
        .await;
    assert_error(&r, 401, "invalid_api_key");
    assert!(!h.model("chat-a").pinned);
    assert_eq!(call(&h, "GET", "/health", None).await.status(), 200);
    let public = keyed(true);
    assert_eq!(call(&public, "GET", "/metrics", None).await.status(), 200);
    assert_error(&call(&public, "GET", "/admin/pool", None).await, 401, "invalid_api_key");
}

#[tokio::test]
async fn without_keys_every_route_is_open_as_before() {
    let h = Harness::new(10 * GB, 4);
    for path in ["/v1/models", "/admin/pool", "/metrics", "/health"] {
        assert_eq!(call(&h, "GET", path, None).await.status(), 200, "{path}");
    }
}

fn merge(a: &[&str], toml: &str) -> Result<ServeConfig, String> {
    let file = FileConfig::from_toml(toml, "f.toml").map_err(|e| e.0)?;
    ServeConfig::merge(&args(a), file, "f.toml").map_err(|e| e.0)
}

#[test]
fn a_non_loopback_listen_needs_both_keys_or_the_explicit_opt_out() {
    for a in [
        &["--listen", "0.0.0.0:8080"][..],
        &["--listen", "192.168.1.10:8080", "--api-key", USER],
        &["--listen", "[::]:8080", "--admin-key", ADMIN],
    ] {
        let e = merge(a, "").unwrap_err();
        assert!(
            e.contains("not a loopback address")
                && e.contains("--api-key")
                && e.contains("--insecure-no-auth"),
            "{e}"
        );
    }
    for a in [
        &["--listen", "0.0.0.0:8080", "--api-key", USER, "--admin-key", ADMIN][..],
        &["--listen", "0.0.0.0:8080", "--insecure-no-auth"],
        &["--listen", "127.0.0.2:8080"],
        &["--listen", "[::1]:8080"],
    ] {
        merge(a, "").unwrap_or_else(|e| panic!("{a:?}: {e}"));
    }
    let c = merge(&["--listen", "0.0.0.0:8080"], "insecure_no_auth = true").unwrap();
    assert!(c.insecure_no_auth && c.api_keys.is_empty());
}

#[test]
fn keys_come_from_flags_the_file_and_keys_files_and_never_print() {
    let d = tempfile::tempdir().unwrap();
    let kf = d.path().join("keys.txt");
    std::fs::write(&kf, "# team keys\nsk-file-1\n\n  sk-file-2  \n").unwrap();
    let toml = format!(
        "api_keys = [\"sk-toml\"]\nadmin_keys = [\"adm-toml\"]\napi_keys_file = {:?}\n",
        kf.display().to_string()
    );
    let c = merge(&[], &toml).unwrap();
    let texts =
        |v: &[modelpool::config::ApiKey]| v.iter().map(|k| k.expose().to_string()).collect::<Vec<_>>();
    assert_eq!(texts(&c.api_keys), ["sk-toml", "sk-file-1", "sk-file-2"]);
    assert_eq!(texts(&c.admin_keys), ["adm-toml"]);
    // A flag replaces the file's list; the keys file still adds.
    let c = merge(&["--api-key", "sk-a", "--api-key", "sk-b"], &toml).unwrap();
    assert_eq!(texts(&c.api_keys), ["sk-a", "sk-b", "sk-file-1", "sk-file-2"]);
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("sk-a") && !dbg.contains("sk-file") && !dbg.contains("adm-toml"), "{dbg}");
    // Bad keys and empty keys files are errors naming where, not the key.
    let e = merge(&[], "api_keys = [\"has space\"]").unwrap_err();
    assert!(e.contains("api_keys") && e.contains("visible ASCII"), "{e}");
    std::fs::write(&kf, "# nothing\n").unwrap();
    let e = merge(&["--api-keys-file", kf.to_str().unwrap()], "").unwrap_err();
    assert!(e.contains("has no keys"), "{e}");
    std::fs::write(&kf, "ok-key\nbad key here\n").unwrap();
    let e = merge(&["--api-keys-file", kf.to_str().unwrap()], "").unwrap_err();
    assert!(e.contains("line 2") && !e.contains("bad key here"), "{e}");
}

#[test]
fn the_binary_refuses_an_open_lan_listen_and_says_how_to_set_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelpool"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("MODELPOOL_API_KEY")
        .env_remove("MODELPOOL_ADMIN_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--api-key KEY --admin-key KEY") && stderr.contains("MODELPOOL_API_KEY"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    // Keys from the environment (comma lists) satisfy the check.
    let out = Command::new(env!("CARGO_BIN_EXE_modelpool"))
        .args(["serve", "--listen", "0.0.0.0:0", "--max-models", "0"])
        .env("MODELPOOL_API_KEY", "k1,k2")
        .env("MODELPOOL_ADMIN_KEY", "a1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It got past the key check to the next flag's error (so nothing was bound).
    assert!(!stderr.contains("loopback") && stderr.contains("max-models"), "{stderr}");
}

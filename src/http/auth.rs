//! API keys, OpenAI style: `Authorization: Bearer <key>`.
//!
//! Which routes need which key ([`Auth::required`]):
//! - no key configured at all: every route is open (the loopback default; a non-loopback
//!   `--listen` without keys is refused at start unless `--insecure-no-auth`);
//! - `/v1/*`: an API key or an admin key, once any API key is configured;
//! - `/admin/*`: an admin key, once any key is configured (with API keys but no admin key
//!   the admin API is closed: nobody can unload models by knowing no key);
//! - `/metrics`: as `/admin/*`, unless `--public-metrics`;
//! - `/health` and every other path: open (unknown paths still get their 404).
//!
//! Keys are kept only as SHA-256 digests and a presented key is compared, digest against
//! digest, with [`subtle`]'s constant-time equality against every configured key (no early
//! exit, no length leak). A key is never logged, echoed in a reply or kept in a `Debug`.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use warp::http::HeaderValue;

use crate::config::ApiKey;

/// The access a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key needed.
    Open,
    /// An API key (or an admin key).
    Api,
    /// An admin key.
    Admin,
}

/// Why a request was refused (the reply is a 401 `invalid_api_key` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header, or not a `Bearer` one.
    Missing,
    /// A bearer token that is no key of the kind the path needs.
    Wrong,
    /// The path needs an admin key and none is configured.
    NoAdminKey,
}

impl AuthFailure {
    /// A short label for logs and metrics (never the key).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Wrong => "wrong",
            AuthFailure::NoAdminKey => "no_admin_key",
        }
    }
}

type KeyDigest = [u8; 32];

/// The configured keys, as digests. Cheap to share behind an `Arc`.
#[derive(Clone, Default)]
pub struct Auth {
    api: Vec<KeyDigest>,
    admin: Vec<KeyDigest>,
    public_metrics: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.api.len())
            .field("admin_keys", &self.admin.len())
            .field("public_metrics", &self.public_metrics)
            .finish()
    }
}

fn digest(token: &[u8]) -> KeyDigest {
    Sha256::digest(token).into()
}

/// Whether `d` equals one of `keys`, looking at every key whatever the answer.
fn any_matches(keys: &[KeyDigest], d: &KeyDigest) -> bool {
    let mut found = Choice::from(0);
    for k in keys {
        found |= k.ct_eq(d);
    }
    found.into()
}

/// The token of an `Authorization: Bearer <token>` header value: the scheme in any case,
/// then one or more spaces, then a non-empty token (surrounding spaces dropped). `None` for
/// any other value.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

impl Auth {
    /// No keys: every route open.
    pub fn open() -> Self {
        Auth::default()
    }

    /// Keys for `/v1/*` (`api`) and `/admin/*` (`admin`); `/metrics` open when
    /// `public_metrics`, else as `/admin/*`.
    pub fn new(api: &[ApiKey], admin: &[ApiKey], public_metrics: bool) -> Self {
        let d = |keys: &[ApiKey]| keys.iter().map(|k| digest(k.expose().as_bytes())).collect();
        Auth { api: d(api), admin: d(admin), public_metrics }
    }

    /// Whether any key is configured (otherwise [`Auth::check`] always passes).
    pub fn enabled(&self) -> bool {
        !self.api.is_empty() || !self.admin.is_empty()
    }

    /// The access `path` needs (see the module docs).
    pub fn required(&self, path: &str) -> Access {
        if !self.enabled() {
            return Access::Open;
        }
        let under = |prefix: &str| {
            path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/v1") {
            if self.api.is_empty() { Access::Open } else { Access::Api }
        } else if under("/admin") || (under("/metrics") && !self.public_metrics) {
            Access::Admin
        } else {
            Access::Open
        }
    }

    /// Check a request to `path` carrying `authorization` (the header's raw value, if any).
    pub fn check(&self, path: &str, authorization: Option<&HeaderValue>) -> Result<(), AuthFailure> {
        let need = self.required(path);
        if need == Access::Open {
            return Ok(());
        }
        if need == Access::Admin && self.admin.is_empty() {
            return Err(AuthFailure::NoAdminKey);
        }
        let token = authorization.and_then(|v| bearer_token(v.as_bytes())).ok_or(AuthFailure::Missing)?;
        let d = digest(token);
        // Both lists are always compared, so the time does not say which kind of key it was.
        let admin = any_matches(&self.admin, &d);
        let api = any_matches(&self.api, &d);
        let ok = match need {
            Access::Admin => admin,
            _ => admin | api,
        };
        if ok { Ok(()) } else { Err(AuthFailure::Wrong) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ApiKey {
        s.parse().unwrap()
    }

    #[test]
    fn bearer_tokens_are_parsed_as_openai_clients_send_them() {
        assert_eq!(bearer_token(b"Bearer sk-1"), Some(&b"sk-1"[..]));
        assert_eq!(bearer_token(b"bearer   sk-1 "), Some(&b"sk-1"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic c2stMQ=="), None);
        assert_eq!(bearer_token(b"sk-1"), None);
        assert_eq!(bearer_token(b""), None);
    }

    #[test]
    fn each_route_group_needs_its_own_key() {
        let a = Auth::new(&[key("user-key")], &[key("admin-key")], false);
        let h = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        assert_eq!(a.check("/v1/models", Some(&h("user-key"))), Ok(()));
        assert_eq!(a.check("/v1/models", Some(&h("admin-key"))), Ok(()));
        assert_eq!(a.check("/v1/models", Some(&h("nope"))), Err(AuthFailure::Wrong));
        assert_eq!(a.check("/v1/models", None), Err(AuthFailure::Missing));
        assert_eq!(a.check("/admin/pool", Some(&h("user-key"))), Err(AuthFailure::Wrong));
        assert_eq!(a.check("/admin/pool", Some(&h("admin-key"))), Ok(()));
        assert_eq!(a.check("/metrics", Some(&h("user-key"))), Err(AuthFailure::Wrong));
        assert_eq!(a.check("/metrics", Some(&h("admin-key"))), Ok(()));
        assert_eq!(a.check("/health", None), Ok(()));
        // Prefixes are whole path segments.
        assert_eq!(a.check("/v1x", None), Ok(()));
        assert_eq!(a.check("/administrator", None), Ok(()));
        let public = Auth::new(&[key("user-key")], &[key("admin-key")], true);
        assert_eq!(public.check("/metrics", None), Ok(()));
        assert_eq!(public.check("/admin/pool", None), Err(AuthFailure::Missing));
    }

    #[test]
    fn api_keys_without_an_admin_key_close_the_admin_api() {
        let a = Auth::new(&[key("user-key")], &[], false);
        let h = HeaderValue::from_static("Bearer user-key");
        assert_eq!(a.check("/v1/models", Some(&h)), Ok(()));
        assert_eq!(a.check("/admin/pool", Some(&h)), Err(AuthFailure::NoAdminKey));
        let open = Auth::open();
        assert_eq!(open.check("/admin/pool", None), Ok(()));
        // Only an admin key: /v1 stays open, /admin needs it.
        let admin_only = Auth::new(&[], &[key("admin-key")], false);
        assert_eq!(admin_only.check("/v1/models", None), Ok(()));
        assert_eq!(admin_only.check("/admin/pool", None), Err(AuthFailure::Missing));
    }

    #[test]
    fn debug_never_shows_a_key() {
        let a = Auth::new(&[key("secret-user-key")], &[key("secret-admin-key")], false);
        let s = format!("{a:?} {:?}", key("secret-user-key"));
        assert!(!s.contains("secret"), "{s}");
    }
}

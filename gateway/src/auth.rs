//! Who is logging in: the [`Authenticator`] trait and its two implementations.
//!
//! The default, [`HmacAuthenticator`], verifies a token the back end minted with a secret it
//! shares with the gateway:
//!
//! ```text
//! v1.<b64url(user_id)>.<b64url(device_id)>.<expiry, Unix seconds>.<b64url(HMAC-SHA256(secret, everything before this dot))>
//! ```
//!
//! (base64url without padding). [`mint_token`] makes one. [`DevAuthenticator`] accepts any
//! token; it must be switched on explicitly (`--dev-auth`) and the gateway logs a warning.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tether_protocol::pb::{self, ErrorCode};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Longest user or device id accepted, bytes.
pub const MAX_ID_LEN: usize = 256;

/// Who a login is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub device_id: String,
}

/// Why a login was refused: the LOGIN_RESULT code and a message for the client's logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: ErrorCode,
    pub message: String,
    /// The metric label.
    pub reason: &'static str,
}

impl AuthError {
    fn failed(reason: &'static str, message: impl Into<String>) -> AuthError {
        AuthError {
            code: ErrorCode::AuthFailed,
            message: message.into(),
            reason,
        }
    }
}

/// Decides who a LOGIN is. Called on a worker thread for every login: must not block.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, login: &pb::Login, now_unix_ms: u64) -> Result<Identity, AuthError>;
}

fn check_ids(login: &pb::Login) -> Result<(), AuthError> {
    for (what, id) in [("user_id", &login.user_id), ("device_id", &login.device_id)] {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(AuthError::failed(
                "bad_id",
                format!("{what} must be 1..={MAX_ID_LEN} bytes"),
            ));
        }
    }
    Ok(())
}

/// Accepts every login as the user and device it claims.
#[derive(Debug, Default, Clone, Copy)]
pub struct DevAuthenticator;

impl Authenticator for DevAuthenticator {
    fn authenticate(&self, login: &pb::Login, _now: u64) -> Result<Identity, AuthError> {
        check_ids(login)?;
        Ok(Identity {
            user_id: login.user_id.clone(),
            device_id: login.device_id.clone(),
        })
    }
}

/// Verifies HMAC-SHA256-signed tokens (module docs).
#[derive(Clone)]
pub struct HmacAuthenticator {
    secret: Vec<u8>,
}

impl std::fmt::Debug for HmacAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacAuthenticator { .. }")
    }
}

impl HmacAuthenticator {
    pub fn new(secret: impl Into<Vec<u8>>) -> HmacAuthenticator {
        HmacAuthenticator {
            secret: secret.into(),
        }
    }
}

fn mac(secret: &[u8], signed: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(signed.as_bytes());
    m
}

/// A token for `user_id` on `device_id`, valid until `expires_unix_secs`.
pub fn mint_token(secret: &[u8], user_id: &str, device_id: &str, expires_unix_secs: u64) -> String {
    let signed = format!(
        "v1.{}.{}.{expires_unix_secs}",
        B64.encode(user_id),
        B64.encode(device_id)
    );
    let tag = mac(secret, &signed).finalize().into_bytes();
    format!("{signed}.{}", B64.encode(tag))
}

impl Authenticator for HmacAuthenticator {
    fn authenticate(&self, login: &pb::Login, now_unix_ms: u64) -> Result<Identity, AuthError> {
        check_ids(login)?;
        let token = login.token.as_str();
        let bad = || AuthError::failed("bad_token", "token is not a valid v1 token");
        let (signed, tag) = token.rsplit_once('.').ok_or_else(bad)?;
        let tag = B64.decode(tag).map_err(|_| bad())?;
        // Constant-time comparison.
        mac(&self.secret, signed)
            .verify_slice(&tag)
            .map_err(|_| AuthError::failed("bad_signature", "token signature does not verify"))?;
        let mut parts = signed.split('.');
        let (Some("v1"), Some(user), Some(device), Some(exp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let decode = |s: &str| {
            B64.decode(s)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)
        };
        let (user, device) = (decode(user)?, decode(device)?);
        let exp: u64 = exp.parse().map_err(|_| bad())?;
        if user != login.user_id || device != login.device_id {
            return Err(AuthError::failed(
                "identity_mismatch",
                "user_id or device_id does not match the token",
            ));
        }
        if exp.saturating_mul(1000) <= now_unix_ms {
            return Err(AuthError {
                code: ErrorCode::TokenExpired,
                message: "token expired".into(),
                reason: "token_expired",
            });
        }
        Ok(Identity {
            user_id: user,
            device_id: device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str, device: &str, token: String) -> pb::Login {
        pb::Login {
            token,
            user_id: user.into(),
            device_id: device.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let a = HmacAuthenticator::new("s3cret");
        let t = mint_token(b"s3cret", "alice", "phone", 1_000);
        let ok = a.authenticate(&login("alice", "phone", t.clone()), 999_999);
        assert_eq!(ok.unwrap().user_id, "alice");
        let e = a
            .authenticate(&login("alice", "phone", t), 1_000_000)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::TokenExpired);
    }

    #[test]
    fn wrong_secret_identity_or_garbage_fails() {
        let a = HmacAuthenticator::new("s3cret");
        let t = mint_token(b"other", "alice", "phone", 10_000);
        let e = a.authenticate(&login("alice", "phone", t), 0).unwrap_err();
        assert_eq!((e.code, e.reason), (ErrorCode::AuthFailed, "bad_signature"));
        let t = mint_token(b"s3cret", "alice", "phone", 10_000);
        let e = a
            .authenticate(&login("mallory", "phone", t.clone()), 0)
            .unwrap_err();
        assert_eq!(e.reason, "identity_mismatch");
        let e = a.authenticate(&login("alice", "tablet", t), 0).unwrap_err();
        assert_eq!(e.reason, "identity_mismatch");
        for garbage in ["", "v1", "....", "v1.a.b.c.d.e", "x.y"] {
            let e = a
                .authenticate(&login("alice", "phone", garbage.into()), 0)
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::AuthFailed, "{garbage:?}");
        }
    }

    #[test]
    fn a_tampered_expiry_does_not_verify() {
        let a = HmacAuthenticator::new("k");
        let t = mint_token(b"k", "u", "d", 5);
        let forged = t.replacen(".5.", ".99999999999.", 1);
        assert_ne!(t, forged);
        let e = a
            .authenticate(&login("u", "d", forged), 10_000)
            .unwrap_err();
        assert_eq!(e.reason, "bad_signature");
    }

    #[test]
    fn dev_mode_takes_the_claimed_ids_but_not_empty_ones() {
        let id = DevAuthenticator.authenticate(&login("u", "d", String::new()), 0);
        assert_eq!(id.unwrap().device_id, "d");
        assert!(DevAuthenticator
            .authenticate(&login("", "d", String::new()), 0)
            .is_err());
    }
}

//! Token authentication of subscribing requests (`auth = true`).
//!
//! The keys live in one process-wide `RwLock<Arc<KeySet>>`: a handshake
//! clones the `Arc` (a read lock held for an increment) and verifies with
//! it; a SIGHUP (the reload thread, see `main`) builds a new set from the
//! re-read configuration file and swaps the `Arc`. Connections already open are untouched (their grant was
//! checked at the handshake; their expiry is in their slab entry). A file
//! that no longer parses, or a key that does not load, keeps the old keys
//! and is logged as an error.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::token::{self, Grant, KeySet, TokenError};
use tracing::{error, info};

use crate::config::Config;

static KEYS: OnceLock<RwLock<Arc<KeySet>>> = OnceLock::new();

/// Why a subscribing request is refused.
pub enum Denied {
    /// No token, or one that does not verify: 401.
    Token(TokenError),
    /// A valid token that does not allow this channel: 403.
    Channel(String),
}

/// Installs the configuration's keys (auth on). Call once, before the
/// cores serve; a SIGHUP then calls [`reload`].
pub fn start(cfg: &'static Config) -> Result<(), String> {
    if !cfg.auth {
        return Ok(());
    }
    let keys = cfg.key_set()?;
    info!(keys = ?keys, "token authentication on");
    let _ = KEYS.set(RwLock::new(Arc::new(keys)));
    Ok(())
}

/// Re-reads the keys of the configuration file and swaps them in; on any
/// error the old keys stay. Nothing when auth is off.
pub fn reload(cfg: &Config) {
    let Some(lock) = KEYS.get() else { return };
    match cfg.reload_key_set() {
        Ok(keys) if keys.is_empty() => {
            error!("SIGHUP: the configuration has no auth key; keeping the old keys");
        }
        Ok(keys) => {
            info!(keys = ?keys, "SIGHUP: auth keys reloaded");
            *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        }
        Err(e) => error!(error = %e, "SIGHUP: auth keys not reloaded; keeping the old keys"),
    }
}

/// The current keys (the set a SIGHUP may replace at any time).
fn keys() -> Arc<KeySet> {
    let lock = KEYS.get().expect("auth on without keys installed");
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Checks a subscribing request's token against the current keys at the
/// wall-clock time of the handshake, and every requested channel against
/// its grant. Returns the seconds left until the connection's authorization
/// ends (the token's `exp` plus the leeway the handshake allowed) and the
/// grant.
pub fn check(
    cfg: &Config,
    token: Option<&str>,
    channels: &[String],
) -> Result<(u64, Grant), Denied> {
    let now_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let grant: Grant = token::verify(token.unwrap_or(""), &keys(), now_unix_s, cfg.auth_leeway_s)
        .map_err(Denied::Token)?;
    if let Some(refused) = channels.iter().find(|c| !grant.allows(c)) {
        return Err(Denied::Channel(refused.clone()));
    }
    let seconds_left = grant
        .expires_at_s
        .saturating_add(cfg.auth_leeway_s)
        .saturating_sub(now_unix_s);
    Ok((seconds_left, grant))
}

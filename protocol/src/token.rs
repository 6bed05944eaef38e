//! Token verification: the short-lived JWTs a client presents when it opens a
//! WebSocket or an SSE stream (`Authorization: Bearer <token>`, see
//! [`bearer`], or a `token` query parameter).
//!
//! Sans-IO like the rest of the crate: the token, a [`KeySet`] and the current
//! time go in; a [`Grant`] or a [`TokenError`] comes out. Nothing here reads a
//! clock or a file. The gateway reads its key files, builds a `KeySet`, and on
//! reload (SIGHUP) builds a new one and swaps it in: that is how keys rotate
//! (a set holding the old and the new `kid` while tokens signed with either are
//! still in use, then one without the old `kid`).
//!
//! The signatures themselves are checked by `jsonwebtoken` (on `ring`); this
//! module reads the token's structure and claims, and picks the key and the
//! algorithm. The algorithm always comes from the key, never from the token.
//!
//! # What a token must be
//!
//! A JWS in compact serialization (RFC 7515 §7.1): three base64url parts
//! without padding, `header.claims.signature`, at most [`TOKEN_BYTES_MAX`]
//! bytes in all.
//!
//! - The header is a JSON object whose `kid` names a key of the set and whose
//!   `alg` is that key's algorithm, exactly (`HS256`, `RS256` or `ES256`). So
//!   `alg: none` is refused, and so is an `HS256` token whose `kid` names an
//!   RSA or EC key (an HMAC keyed with the public key: the classic algorithm
//!   confusion). A `crit` member is refused: this module understands no
//!   extension (RFC 7515 §4.1.11). Other members (`typ`, `jku`, `x5u`, `jwk`…)
//!   are ignored: keys come from the set and nowhere else.
//! - The claims are a JSON object:
//!   - `exp` (required) and `nbf` (optional): NumericDate, seconds since the
//!     Unix epoch as a non-negative JSON number. A fraction is rounded to the
//!     stricter side (`exp` down, `nbf` up).
//!   - `channels` (required): an array of channel patterns (below). An empty
//!     array is a valid token that allows no channel.
//!   - `send` (optional): the channels the client may send messages on
//!     (two-way traffic), patterns like `channels`; absent, it may send on
//!     none.
//!   - `sub` (optional): a string, handed on in the [`Grant`] for logs.
//!   - `aud`: a string or an array of strings. When the set has audiences
//!     ([`KeySet::set_audiences`]) the token must name one of them; when it
//!     has none, a token that names any audience is refused (RFC 7519
//!     §4.1.3: a recipient that is not in `aud` must reject it).
//!   - Anything else (`iat`, `iss`, `jti`…) is ignored.
//!
//! Where a name appears twice in one JSON object the last one counts (RFC 7515
//! §5.2 allows that or a refusal).
//!
//! # Channel patterns
//!
//! Each entry of `channels` is one of:
//!
//! - an exact channel name, `news`: that channel only (not `news2`, not
//!   `news.uk`);
//! - a prefix followed by a single `*`, `news.*`: every channel whose name
//!   starts with the prefix (`news.uk`, and `news.` itself), but not `news`;
//! - `*` alone: every channel.
//!
//! Names and prefixes use the channel name charset
//! ([`crate::limits::CHANNEL_NAME_CHARSET`]) and length
//! ([`crate::limits::CHANNEL_NAME_BYTES_MAX`]); `*` appears only once, last.
//! An entry that is none of these makes the whole token [`TokenError::BadClaims`]:
//! a token is refused rather than half understood.
//!
//! # Status codes
//!
//! Every [`TokenError`] is answered 401 (with [`TokenError::www_authenticate`]).
//! A valid token that does not allow a requested channel is the caller's
//! check, [`Grant::allows`], and is answered 403.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::channel::valid_channel_name;
use crate::limits::CHANNEL_NAME_BYTES_MAX;

/// A token longer than this is refused before anything else is done with it
/// ([`TokenError::TooLong`]). An RS256 token with a 2048-bit key spends 342
/// bytes on its signature and about 100 on its header; the rest leaves room
/// for dozens of channel patterns. It also fits a query string under
/// [`crate::limits::URL_BYTES_MAX`].
pub const TOKEN_BYTES_MAX: usize = 4 * 1024;

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
pub const HS256_SECRET_BYTES_MIN: usize = 32;

/// The RSA modulus sizes `ring` verifies (`RSA_PKCS1_2048_8192_SHA256`); a key
/// outside this range is refused when it is added, not on every token.
pub const RSA_MODULUS_BITS_MIN: u64 = 2048;
/// See [`RSA_MODULUS_BITS_MIN`].
pub const RSA_MODULUS_BITS_MAX: u64 = 8192;

/// The DER of a P-256 public key (SubjectPublicKeyInfo) up to the point:
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (66 bytes,
/// no unused bits) }. The point that follows is 65 bytes, uncompressed (0x04).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The signature algorithms a key can be used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 and an RSA public key.
    Rs256,
    /// ECDSA with P-256 and SHA-256 and an EC public key.
    Es256,
}

impl KeyAlgorithm {
    /// The JOSE name, as written in a token's `alg` (e.g. "HS256").
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::Hs256 => "HS256",
            KeyAlgorithm::Rs256 => "RS256",
            KeyAlgorithm::Es256 => "ES256",
        }
    }

    /// The algorithm with this JOSE name, exactly as [`KeyAlgorithm::name`]
    /// writes it (JOSE names are case-sensitive).
    pub fn from_name(name: &str) -> Option<KeyAlgorithm> {
        match name {
            "HS256" => Some(KeyAlgorithm::Hs256),
            "RS256" => Some(KeyAlgorithm::Rs256),
            "ES256" => Some(KeyAlgorithm::Es256),
            _ => None,
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlgorithm::Hs256 => Algorithm::HS256,
            KeyAlgorithm::Rs256 => Algorithm::RS256,
            KeyAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a key was not added to a [`KeySet`]. Named after the rule that was
/// broken; each names the key's `kid` so an operator knows which entry of the
/// configuration to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The `kid` is empty: no token could name the key.
    EmptyKid,
    /// The set already has a key with this `kid`.
    DuplicateKid { kid: String },
    /// An HS256 secret shorter than [`HS256_SECRET_BYTES_MIN`].
    SecretTooShort { kid: String, bytes: usize },
    /// The material is not a PEM document.
    NotPem { kid: String },
    /// A PEM document that is not a public key (a private key, a
    /// certificate…). The gateway only verifies, so it only takes public keys.
    NotAPublicKey { kid: String, label: String },
    /// A public key of another type than the algorithm needs: not RSA for
    /// RS256, not P-256 for ES256.
    WrongKeyType { kid: String, alg: KeyAlgorithm },
    /// An RSA modulus outside [`RSA_MODULUS_BITS_MIN`]..=[`RSA_MODULUS_BITS_MAX`].
    RsaKeySize { kid: String, bits: u64 },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::EmptyKid => write!(f, "a key has an empty kid"),
            KeyError::DuplicateKid { kid } => write!(f, "key {kid:?}: kid used twice"),
            KeyError::SecretTooShort { kid, bytes } => write!(
                f,
                "key {kid:?}: HS256 secret is {bytes} bytes, at least {HS256_SECRET_BYTES_MIN} are needed"
            ),
            KeyError::NotPem { kid } => write!(f, "key {kid:?}: not a PEM document"),
            KeyError::NotAPublicKey { kid, label } => write!(
                f,
                "key {kid:?}: PEM holds {label:?}, a public key (\"PUBLIC KEY\") is needed"
            ),
            KeyError::WrongKeyType { kid, alg } => {
                let want = match alg {
                    KeyAlgorithm::Hs256 => "a secret",
                    KeyAlgorithm::Rs256 => "an RSA public key",
                    KeyAlgorithm::Es256 => "a P-256 public key",
                };
                write!(f, "key {kid:?}: {alg} needs {want}")
            }
            KeyError::RsaKeySize { kid, bits } => write!(
                f,
                "key {kid:?}: RSA modulus is {bits} bits, \
                 {RSA_MODULUS_BITS_MIN} to {RSA_MODULUS_BITS_MAX} are supported"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// One verification key and the only algorithm it is used with.
#[derive(Clone)]
struct Key {
    alg: KeyAlgorithm,
    decoding: DecodingKey,
}

/// The keys tokens may be signed with, by `kid`, each with its algorithm, and
/// the audiences this gateway answers to. Immutable once built in practice:
/// rotation builds a new set and swaps it in.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
    audiences: Vec<String>,
}

impl KeySet {
    /// An empty set: it refuses every token ([`TokenError::UnknownKid`]).
    pub fn new() -> KeySet {
        KeySet::default()
    }

    /// Adds an HS256 key: a shared secret of at least
    /// [`HS256_SECRET_BYTES_MIN`] bytes.
    pub fn add_hs256(&mut self, kid: &str, secret: &[u8]) -> Result<(), KeyError> {
        self.add(kid, KeyAlgorithm::Hs256, secret)
    }

    /// Adds an RS256 key: an RSA public key in PEM, SubjectPublicKeyInfo
    /// (`BEGIN PUBLIC KEY`, what `openssl pkey -pubout` writes) or PKCS#1
    /// (`BEGIN RSA PUBLIC KEY`), with a 2048- to 8192-bit modulus.
    pub fn add_rs256_pem(&mut self, kid: &str, pem: &[u8]) -> Result<(), KeyError> {
        self.add(kid, KeyAlgorithm::Rs256, pem)
    }

    /// Adds an ES256 key: a P-256 public key in PEM, SubjectPublicKeyInfo
    /// (`BEGIN PUBLIC KEY`) with the named curve and an uncompressed point.
    pub fn add_es256_pem(&mut self, kid: &str, pem: &[u8]) -> Result<(), KeyError> {
        self.add(kid, KeyAlgorithm::Es256, pem)
    }

    /// Adds a key for `alg`: `material` is the secret for HS256 and the PEM
    /// public key otherwise (see the `add_*` methods). For a configuration
    /// that names the algorithm ([`KeyAlgorithm::from_name`]).
    pub fn add(&mut self, kid: &str, alg: KeyAlgorithm, material: &[u8]) -> Result<(), KeyError> {
        if kid.is_empty() {
            return Err(KeyError::EmptyKid);
        }
        if self.keys.contains_key(kid) {
            return Err(KeyError::DuplicateKid { kid: kid.into() });
        }
        let decoding = match alg {
            KeyAlgorithm::Hs256 => {
                if material.len() < HS256_SECRET_BYTES_MIN {
                    return Err(KeyError::SecretTooShort {
                        kid: kid.into(),
                        bytes: material.len(),
                    });
                }
                DecodingKey::from_secret(material)
            }
            KeyAlgorithm::Rs256 => {
                let pem = public_key_pem(kid, material)?;
                let bits = rsa_modulus_bits(&pem).ok_or_else(|| KeyError::WrongKeyType {
                    kid: kid.into(),
                    alg,
                })?;
                if !(RSA_MODULUS_BITS_MIN..=RSA_MODULUS_BITS_MAX).contains(&bits) {
                    return Err(KeyError::RsaKeySize {
                        kid: kid.into(),
                        bits,
                    });
                }
                DecodingKey::from_rsa_pem(material).map_err(|_| KeyError::WrongKeyType {
                    kid: kid.into(),
                    alg,
                })?
            }
            KeyAlgorithm::Es256 => {
                let pem = public_key_pem(kid, material)?;
                let der = pem.contents();
                let is_p256 = pem.tag() == "PUBLIC KEY"
                    && der.len() == P256_SPKI_PREFIX.len() + 65
                    && der.starts_with(&P256_SPKI_PREFIX)
                    && der.get(P256_SPKI_PREFIX.len()) == Some(&0x04);
                if !is_p256 {
                    return Err(KeyError::WrongKeyType {
                        kid: kid.into(),
                        alg,
                    });
                }
                DecodingKey::from_ec_pem(material).map_err(|_| KeyError::WrongKeyType {
                    kid: kid.into(),
                    alg,
                })?
            }
        };
        self.keys.insert(kid.into(), Key { alg, decoding });
        Ok(())
    }

    /// The audiences this gateway answers to (several where identity
    /// providers name it differently, or during a rename): from now on a
    /// token must name one of them in `aud`. With none, tokens that carry
    /// `aud` at all are refused.
    pub fn set_audiences(&mut self, audiences: &[String]) {
        self.audiences = audiences.to_vec();
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (and so refuses every token).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The algorithm of the key named `kid`, if the set has it.
    pub fn algorithm(&self, kid: &str) -> Option<KeyAlgorithm> {
        self.keys.get(kid).map(|k| k.alg)
    }
}

/// Shows each `kid` with its algorithm, never the key material.
impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<(&str, &str)> = self
            .keys
            .iter()
            .map(|(kid, key)| (kid.as_str(), key.alg.name()))
            .collect();
        keys.sort_unstable();
        f.debug_struct("KeySet")
            .field("keys", &keys)
            .field("audiences", &self.audiences)
            .finish()
    }
}

/// The PEM document in `material`, which must be a public key.
fn public_key_pem(kid: &str, material: &[u8]) -> Result<pem::Pem, KeyError> {
    let pem = pem::parse(material).map_err(|_| KeyError::NotPem { kid: kid.into() })?;
    match pem.tag() {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => Ok(pem),
        other => Err(KeyError::NotAPublicKey {
            kid: kid.into(),
            label: other.into(),
        }),
    }
}

/// The modulus size of an RSA public key, PKCS#1 (`RSA PUBLIC KEY`) or in a
/// SubjectPublicKeyInfo (`PUBLIC KEY`) whose algorithm is rsaEncryption;
/// `None` for anything else.
fn rsa_modulus_bits(pem: &pem::Pem) -> Option<u64> {
    use simple_asn1::{from_der, oid, ASN1Block};

    let pkcs1 = if pem.tag() == "RSA PUBLIC KEY" {
        pem.contents().to_vec()
    } else {
        let blocks = from_der(pem.contents()).ok()?;
        let [ASN1Block::Sequence(_, spki)] = blocks.as_slice() else {
            return None;
        };
        let [ASN1Block::Sequence(_, algorithm), ASN1Block::BitString(_, _, key)] = spki.as_slice()
        else {
            return None;
        };
        // rsaEncryption, 1.2.840.113549.1.1.1 (RFC 8017 appendix A.1).
        let rsa_encryption = oid!(1, 2, 840, 113_549, 1, 1, 1);
        match algorithm.first() {
            Some(ASN1Block::ObjectIdentifier(_, oid)) if *oid == rsa_encryption => {}
            _ => return None,
        }
        key.clone()
    };
    let blocks = from_der(&pkcs1).ok()?;
    let [ASN1Block::Sequence(_, fields)] = blocks.as_slice() else {
        return None;
    };
    match fields.as_slice() {
        [ASN1Block::Integer(_, modulus), ASN1Block::Integer(_, _exponent)] => Some(modulus.bits()),
        _ => None,
    }
}

/// Who a valid token is for, until when, and which channels it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The `kid` of the key that signed the token (for logs while keys rotate).
    pub kid: String,
    /// The token's `sub`, if it has one.
    pub sub: Option<String>,
    /// The token's `exp`, seconds since the Unix epoch: the connection's
    /// authorization runs out then (the leeway is not added).
    pub expires_at_s: u64,
    channels: Vec<ChannelPattern>,
    /// The `send` claim's patterns (empty when absent).
    pub send: Vec<ChannelPattern>,
    /// The other claims, for the gateway to hand chosen ones to its hubs.
    pub claims: serde_json::Map<String, Value>,
}

impl Grant {
    /// Whether the token allows subscribing to `channel`. A refused channel
    /// is answered 403.
    pub fn allows(&self, channel: &str) -> bool {
        self.channels.iter().any(|p| p.matches(channel))
    }

    /// The channel patterns of the token, in its order.
    pub fn patterns(&self) -> &[ChannelPattern] {
        &self.channels
    }

    /// Whether the token allows sending on `channel` (the `send` claim).
    pub fn allows_send(&self, channel: &str) -> bool {
        self.send.iter().any(|p| p.matches(channel))
    }
}

/// One entry of a token's `channels` claim (syntax in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelPattern {
    /// `news`: this channel only.
    Exact(String),
    /// `news.*` (prefix `news.`) or `*` (empty prefix): every channel that
    /// starts with the prefix.
    Prefix(String),
}

impl ChannelPattern {
    /// Reads one pattern; `None` if it is not a valid name, a valid name
    /// followed by `*`, or `*`.
    pub fn parse(pattern: &str) -> Option<ChannelPattern> {
        match pattern.strip_suffix('*') {
            Some("") => Some(ChannelPattern::Prefix(String::new())),
            Some(prefix) if valid_channel_name(prefix.as_bytes(), CHANNEL_NAME_BYTES_MAX) => {
                Some(ChannelPattern::Prefix(prefix.into()))
            }
            Some(_) => None,
            None if valid_channel_name(pattern.as_bytes(), CHANNEL_NAME_BYTES_MAX) => {
                Some(ChannelPattern::Exact(pattern.into()))
            }
            None => None,
        }
    }

    /// Whether `pattern`, written as a token carries it (a valid one, see
    /// [`ChannelPattern::parse`]), allows `channel`: the same rule as
    /// [`ChannelPattern::matches`], for patterns kept as text.
    pub fn text_matches(pattern: &str, channel: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => channel == pattern,
        }
    }

    /// Whether this pattern allows `channel` (byte for byte; no case folding).
    pub fn matches(&self, channel: &str) -> bool {
        match self {
            ChannelPattern::Exact(name) => channel == name,
            ChannelPattern::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

/// Writes the pattern as a token carries it (`news`, `news.*`, `*`).
impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelPattern::Exact(name) => f.write_str(name),
            ChannelPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Why a token was refused. Named after the rule that was broken; every one
/// is answered 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No token was presented (an empty one included).
    Missing,
    /// The token is longer than [`TOKEN_BYTES_MAX`].
    TooLong,
    /// Not a JWS compact serialization of a JSON object header and JSON
    /// object claims: not three base64url parts, padding, bad JSON…
    Malformed,
    /// The header has no `kid`.
    MissingKid,
    /// The header's `kid` names no key of the set (e.g. a key rotated out).
    UnknownKid,
    /// The header's `alg` is not the algorithm of the key its `kid` names
    /// (`none` included).
    AlgorithmMismatch,
    /// The header has `crit`: it asks for an extension this module does not
    /// implement.
    UnsupportedCritical,
    /// The signature does not verify with the key.
    BadSignature,
    /// The claims have no `exp`.
    MissingExp,
    /// The claims have no `channels`.
    MissingChannels,
    /// A claim of the wrong type (`exp`, `nbf` not a non-negative number,
    /// `sub` not a string, `aud` not a string or strings, `channels` not an
    /// array of valid patterns).
    BadClaims,
    /// The token names an audience other than the set's, or names none when
    /// the set has one, or names one when the set has none.
    AudienceMismatch,
    /// `now` is past `exp` + leeway.
    Expired,
    /// `now` + leeway is before `nbf`.
    NotYetValid,
}

impl TokenError {
    /// The HTTP status code: 401 for every token error.
    pub fn status(&self) -> u16 {
        401
    }

    /// A short, stable, lowercase reason written in the response body and
    /// logs (e.g. "token expired").
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing token",
            TokenError::TooLong => "token too long",
            TokenError::Malformed => "malformed token",
            TokenError::MissingKid => "missing kid",
            TokenError::UnknownKid => "unknown kid",
            TokenError::AlgorithmMismatch => "algorithm mismatch",
            TokenError::UnsupportedCritical => "unsupported critical header",
            TokenError::BadSignature => "bad signature",
            TokenError::MissingExp => "missing exp",
            TokenError::MissingChannels => "missing channels",
            TokenError::BadClaims => "bad claims",
            TokenError::AudienceMismatch => "audience mismatch",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
        }
    }

    /// The `WWW-Authenticate` header value to send with the 401 (RFC 6750
    /// §3): no error code when no token was presented, `invalid_token`
    /// otherwise.
    pub fn www_authenticate(&self) -> &'static str {
        match self {
            TokenError::Missing => "Bearer",
            _ => "Bearer error=\"invalid_token\"",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for TokenError {}

/// Verifies `token` against `keys` at `now_unix_s` (seconds since the Unix
/// epoch), allowing `leeway_s` seconds of clock skew on `exp` and `nbf`.
///
/// Never panics, whatever the input. Checks run in this order, the first
/// broken rule answering: presence and size; structure (all three parts
/// decoded, before any key is looked at); `kid`; `alg`; `crit`; the
/// signature; then the claims, which are only read once the signature holds:
/// `exp`, `nbf`, `sub`, `channels`, `aud`; the time last, so that a token that
/// could never be valid says why whatever the clock. The token is expired when
/// `now_unix_s > exp + leeway_s` and not yet valid when
/// `nbf > now_unix_s + leeway_s`.
pub fn verify(
    token: &str,
    keys: &KeySet,
    now_unix_s: u64,
    leeway_s: u64,
) -> Result<Grant, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::TooLong);
    }

    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header = json_object(header_b64).ok_or(TokenError::Malformed)?;
    let mut claims = json_object(claims_b64).ok_or(TokenError::Malformed)?;
    // Decoded here only to tell a malformed signature (Malformed) from one
    // that does not verify (BadSignature); jsonwebtoken decodes it again.
    if URL_SAFE_NO_PAD.decode(signature_b64).is_err() {
        return Err(TokenError::Malformed);
    }

    let kid = match header.get("kid") {
        None => return Err(TokenError::MissingKid),
        Some(Value::String(kid)) => kid,
        Some(_) => return Err(TokenError::Malformed),
    };
    let key = keys.keys.get(kid.as_str()).ok_or(TokenError::UnknownKid)?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == key.alg.name() => {}
        Some(Value::String(_)) => return Err(TokenError::AlgorithmMismatch),
        _ => return Err(TokenError::Malformed),
    }
    if header.contains_key("crit") {
        return Err(TokenError::UnsupportedCritical);
    }

    // The signing input is the first two parts and the dot between them.
    let signed = token
        .get(..header_b64.len() + 1 + claims_b64.len())
        .ok_or(TokenError::Malformed)?;
    // The algorithm is the key's (equal to the header's, checked above).
    match jsonwebtoken::crypto::verify(
        signature_b64,
        signed.as_bytes(),
        &key.decoding,
        key.alg.jwt(),
    ) {
        Ok(true) => {}
        Ok(false) | Err(_) => return Err(TokenError::BadSignature),
    }

    let expires_at_s = match claims.get("exp") {
        None => return Err(TokenError::MissingExp),
        Some(exp) => numeric_date(exp, Rounding::Down).ok_or(TokenError::BadClaims)?,
    };
    let not_before_s = match claims.get("nbf") {
        None => None,
        Some(nbf) => Some(numeric_date(nbf, Rounding::Up).ok_or(TokenError::BadClaims)?),
    };
    let sub = match claims.remove("sub") {
        None => None,
        Some(Value::String(sub)) => Some(sub),
        Some(_) => return Err(TokenError::BadClaims),
    };
    let patterns = |v: &Value| match v {
        Value::Array(entries) => entries
            .iter()
            .map(|entry| entry.as_str().and_then(ChannelPattern::parse))
            .collect::<Option<Vec<_>>>()
            .ok_or(TokenError::BadClaims),
        _ => Err(TokenError::BadClaims),
    };
    let channels = match claims.get("channels") {
        None => return Err(TokenError::MissingChannels),
        Some(v) => patterns(v)?,
    };
    let send = match claims.get("send") {
        None => Vec::new(),
        Some(v) => patterns(v)?,
    };
    check_audience(claims.get("aud"), &keys.audiences)?;

    if now_unix_s > expires_at_s.saturating_add(leeway_s) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = not_before_s {
        if nbf > now_unix_s.saturating_add(leeway_s) {
            return Err(TokenError::NotYetValid);
        }
    }

    Ok(Grant {
        kid: kid.clone(),
        sub,
        expires_at_s,
        channels,
        send,
        claims,
    })
}

/// The token of an `Authorization` header value: `Bearer <token>`, the scheme
/// in any case, one or more spaces, and a token in RFC 6750's `b64token`
/// syntax (which every JWT is). `None` for another scheme, no token, or
/// anything after it: the caller answers [`TokenError::Missing`].
pub fn bearer(authorization_header_value: &[u8]) -> Option<&str> {
    let value = trim_ows(authorization_header_value);
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    let token = rest.get(start..)?;
    // b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let body_len = token.len() - token.iter().rev().take_while(|&&b| b == b'=').count();
    let (body, _padding) = token.split_at(body_len);
    let b64token = !body.is_empty()
        && body
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !b64token {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// Header value whitespace (space and tab) trimmed from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A base64url part (no padding, canonical) holding a JSON object.
fn json_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Which way a fractional NumericDate is rounded: always to the stricter side.
enum Rounding {
    Down,
    Up,
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch as a JSON number,
/// here not negative.
fn numeric_date(value: &Value, rounding: Rounding) -> Option<u64> {
    let Value::Number(number) = value else {
        return None;
    };
    if let Some(seconds) = number.as_u64() {
        return Some(seconds);
    }
    let seconds = number.as_f64()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    // A float beyond u64 saturates, which is harmless for a date.
    Some(match rounding {
        Rounding::Down => seconds.floor() as u64,
        Rounding::Up => seconds.ceil() as u64,
    })
}

/// RFC 7519 §4.1.3: `aud` is a string or an array of strings; the recipient
/// must find itself in it (under any of its names), and a recipient that
/// has no audience finds itself in none. A recipient with audiences needs
/// a token that names one of them.
fn check_audience(aud: Option<&Value>, ours: &[String]) -> Result<(), TokenError> {
    let is_ours = |name: &str| ours.iter().any(|o| o == name);
    let named = match aud {
        None => None,
        Some(Value::String(one)) => Some(is_ours(one)),
        Some(Value::Array(many)) => {
            let mut found = false;
            for entry in many {
                let Value::String(entry) = entry else {
                    return Err(TokenError::BadClaims);
                };
                found |= is_ours(entry);
            }
            Some(found)
        }
        Some(_) => return Err(TokenError::BadClaims),
    };
    match (named, ours.is_empty()) {
        (None, true) | (Some(true), false) => Ok(()),
        _ => Err(TokenError::AudienceMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    /// Fixed test keys, made with `openssl genpkey` (RSA 2048, EC P-256) and
    /// `openssl pkey -pubout`. They sign nothing outside these tests.
    const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const HS_SECRET_NEW: &[u8] = b"fedcba9876543210fedcba9876543210";

    const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDXR0NxJukrb/tb
HIDNxZ6ze0n6TF6gRR+xA9hSSxL9kisJLj8+Fu7lnbowSb7y3O4j+tAUeV58q9jF
EmD7Qzmv8LA0WuqnNcZL288gB7EloJp6DOfE9aBe8QrW2CdMYvdAHyoZZVG+14kI
yUYlxj+45Nsj4/L6uo1BFy0f52uyjELilXQg4WqWEwnhIKuNNnC+1l4qobPzKxUe
mWHm3VhhxdlOKQC17jkkjoPbpTCr21AMTjBBtns6y6quwjwAbxmOLL3zN3/IyVfT
Wvax34HqnVJLQDgT4kOWAUlMtPLaXgf7eUdCwpmIvq/Lt51DQuCwzQTG2aVH0ngi
yQ5VTCSpAgMBAAECggEADutzcx4dPtNt+iyJiLlPfGTpBZ3RWQ4xWhVIIrvtPwGo
VeSMoYL5X5SE2N/jifVh08CIN0MKF13Zkh7p9b/8+YKW06oRZTFG4u8C9ddSoab1
zcujLHVRfgL6m1UztAmP1TPTuRrahX1uk9tPL0MEG45Q2bXsmw/exkoS6IkjX6ZU
V86RKzFU0lJWfFPkUGWqT5eAYIZWJNFF97Q+XftVhbGwIpCw1oP1bBnACUJOX5FM
DkTHpXZ04tcQwPt+larW/eaokSUwxua7AG55u02yBWqtToLA7d6sm9OMdNGn7xUi
FNzjo1WM0ZGbfa3KZdH6VRItYBj7PstqK6H6nhGC4QKBgQDwW5WIQUTmYloBRBCc
sgsUaAuPhhagLKLFIfhvbZBwfhb7wr1HPNq8opwHe2G+vY+MX+fMLmMTIHw6fJwX
fkD7LD13VVq42ctEL40b7NlH6o9m8I/PfGxpQllgiiYIiJtAM+dses9SLGPlDfho
/O6FulzTP1l4Kjf4gKfoSqGlrQKBgQDlSdnguiiFWU7M8bLMOA52iIPKsiSSagR9
7H88+QkSqs0V5KcqIXGAya/4UUBsE4OVtLHPJrV1VNFSNUqT0OUl5LdWaMhD8O/E
Gk7qkE0ObOh0IuLw9F5hAXhSs482B4b4XVPTx4uQAXlH6CwXxu2nVN+nbMO8ZxA+
FKZ9LQpCbQKBgQDHLr4+Sgh0+zAnOGaj1A/Ge2qJJ898MUE6KCqe/Kbj8jnNrNX6
QP3rsL2onaCk1qYs6BVJaW+FHDiWp0kbVu82trTBPaSO5z3BZb6EU8TECieIYPZs
NWoJ2IgErrdR/xLZI6o2hZdlO5AU83zWVDS98XCXRzo3kJUNhGCg6agHiQKBgQCq
Klr2u3HjNVqUIzSs91VUhxA4WGln+CKJSgFMQQ6IuhYmj2G4lMVl7UkZo0OKchkP
++CSeonlICORPVexyDCoJMwj5vPp6GApS9URpDJr6EvEFTgT12hL2glwZy57zK5Q
mQLjg46CO3XE9fvzUYGC1CyAVuoVYu/dAvpkoA6jKQKBgFSUA5rpaqJzGIPjfO7+
Ewe/oRQmTCqycSAeAQ72+paLzOs8N8JZ0k/zmAHKmer6qSwRu79rBnv6y7OD1SeX
8zT3u34e9Zi1hOuQHWVvlfN0Msf3nJrsTjVxlbOvqAiP7iE1+N8jbdMZXQSXI0V2
7rHxbtwIDE/mMyG0BwG2h3mc
-----END PRIVATE KEY-----
";
    const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA10dDcSbpK2/7WxyAzcWe
s3tJ+kxeoEUfsQPYUksS/ZIrCS4/Phbu5Z26MEm+8tzuI/rQFHlefKvYxRJg+0M5
r/CwNFrqpzXGS9vPIAexJaCaegznxPWgXvEK1tgnTGL3QB8qGWVRvteJCMlGJcY/
uOTbI+Py+rqNQRctH+drsoxC4pV0IOFqlhMJ4SCrjTZwvtZeKqGz8ysVHplh5t1Y
YcXZTikAte45JI6D26Uwq9tQDE4wQbZ7OsuqrsI8AG8Zjiy98zd/yMlX01r2sd+B
6p1SS0A4E+JDlgFJTLTy2l4H+3lHQsKZiL6vy7edQ0LgsM0ExtmlR9J4IskOVUwk
qQIDAQAB
-----END PUBLIC KEY-----
";
    /// The same public key in PKCS#1 (`openssl rsa -pubin -RSAPublicKey_out`).
    const RSA_PUBLIC_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEA10dDcSbpK2/7WxyAzcWes3tJ+kxeoEUfsQPYUksS/ZIrCS4/Phbu
5Z26MEm+8tzuI/rQFHlefKvYxRJg+0M5r/CwNFrqpzXGS9vPIAexJaCaegznxPWg
XvEK1tgnTGL3QB8qGWVRvteJCMlGJcY/uOTbI+Py+rqNQRctH+drsoxC4pV0IOFq
lhMJ4SCrjTZwvtZeKqGz8ysVHplh5t1YYcXZTikAte45JI6D26Uwq9tQDE4wQbZ7
OsuqrsI8AG8Zjiy98zd/yMlX01r2sd+B6p1SS0A4E+JDlgFJTLTy2l4H+3lHQsKZ
iL6vy7edQ0LgsM0ExtmlR9J4IskOVUwkqQIDAQAB
-----END RSA PUBLIC KEY-----
";
    /// A 1024-bit RSA public key: too small for ring.
    const RSA_1024_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDRKtcFs8XXMZFoyLt7fDENI3zG
6k/6DubNIoeBYx5ubiR2wt8aD+BgJVb6BigYl6hI9F2l065BBhghCUYRPcGzd/iI
zS/9IoxPA/reLybLgTRN0Jh9y1aGDxP0/NGdbi3DYibsGbv3V3hgdD9finz3VwYr
+eAYntdvmytOVBQ2GwIDAQAB
-----END PUBLIC KEY-----
";
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJ8CBH0sYjLsUCN63
wE0x+JkicWqD+WPA1R19ktzjQxihRANCAAS2x5LPyl1sz9y5stHrut+A8Dr5V7/Z
y+zI8j01bSNSBdMmHwZg2M9R2OlKURnWzw+Svl0x3E1K8xD8SiyFV1xI
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtseSz8pdbM/cubLR67rfgPA6+Ve/
2cvsyPI9NW0jUgXTJh8GYNjPUdjpSlEZ1s8Pkr5dMdxNSvMQ/EoshVdcSA==
-----END PUBLIC KEY-----
";
    /// A P-384 public key: the wrong curve for ES256.
    const EC_P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEWiFkQzSML6vIXWGhYrTIK5Rd8yWmL3gs
zAIo0Ozn5Jw1sd/LS4ejVyEF/UKgJiGl4rtbSPEnzjKY9AjMNEmgVNl8LDgTJMRG
MBlcRTSWLU6Qtexw+8DN/pfCxwhX+V3u
-----END PUBLIC KEY-----
";

    /// The test clock: tokens below expire at NOW + 60 unless said otherwise.
    const NOW: u64 = 1_700_000_000;
    const LEEWAY: u64 = 30;

    /// A set with one key of each algorithm: kids "hs", "rs", "es".
    fn keys() -> KeySet {
        let mut keys = KeySet::new();
        keys.add_hs256("hs", HS_SECRET).unwrap();
        keys.add_rs256_pem("rs", RSA_PUBLIC.as_bytes()).unwrap();
        keys.add_es256_pem("es", EC_PUBLIC.as_bytes()).unwrap();
        keys
    }

    fn claims() -> Value {
        json!({"sub": "user-1", "exp": NOW + 60, "iat": NOW, "channels": ["news", "sport.*"]})
    }

    /// A token signed by jsonwebtoken with `alg`, `kid` (if any) and `key`.
    fn mint(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(Into::into);
        encode(&header, claims, key).unwrap()
    }

    fn hs(claims: &Value) -> String {
        mint(
            Algorithm::HS256,
            Some("hs"),
            claims,
            &EncodingKey::from_secret(HS_SECRET),
        )
    }

    fn rs(claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        mint(Algorithm::RS256, Some("rs"), claims, &key)
    }

    fn es(claims: &Value) -> String {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        mint(Algorithm::ES256, Some("es"), claims, &key)
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token assembled by hand from header JSON, claims JSON and a
    /// signature part, for what jsonwebtoken would not write.
    fn raw(header: &str, claims: &str, signature: &str) -> String {
        format!("{}.{}.{signature}", b64(header), b64(claims))
    }

    /// A token with the signature HS256 over `header` and `claims` with the
    /// test secret, so that only the part under test is wrong.
    fn signed_raw(header: &str, claims: &str) -> String {
        let signing_input = format!("{}.{}", b64(header), b64(claims));
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(HS_SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{signing_input}.{signature}")
    }

    /// Replaces a token's claims part, keeping its header and signature.
    fn with_claims(token: &str, claims: &Value) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&claims.to_string()), parts[2])
    }

    #[test]
    fn the_send_claim_is_separate_from_what_may_be_read_and_other_claims_are_kept() {
        let keys = keys();
        let grant = verify(&hs(&claims()), &keys, NOW, 0).unwrap();
        assert!(grant.allows("news") && !grant.allows_send("news"));
        let with_send = json!({"exp": NOW + 60, "channels": ["news"], "send": ["chat.*"],
            "role": "admin"});
        let grant = verify(&hs(&with_send), &keys, NOW, 0).unwrap();
        assert!(grant.allows_send("chat.1") && !grant.allows_send("news"));
        assert!(!grant.allows("chat.1"));
        assert_eq!(grant.claims.get("role"), Some(&json!("admin")));
        for bad in [json!("chat"), json!(["a b"]), json!([1])] {
            let token = hs(&json!({"exp": NOW + 60, "channels": [], "send": bad}));
            assert_eq!(
                verify(&token, &keys, NOW, 0).unwrap_err(),
                TokenError::BadClaims
            );
        }
    }

    #[test]
    fn valid_tokens() {
        let keys = keys();
        for (name, token, kid) in [
            ("hs256", hs(&claims()), "hs"),
            ("rs256", rs(&claims()), "rs"),
            ("es256", es(&claims()), "es"),
        ] {
            let grant =
                verify(&token, &keys, NOW, LEEWAY).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(grant.kid, kid, "{name}");
            assert_eq!(grant.sub.as_deref(), Some("user-1"), "{name}");
            assert_eq!(grant.expires_at_s, NOW + 60, "{name}");
            assert_eq!(
                grant.patterns(),
                [
                    ChannelPattern::Exact("news".into()),
                    ChannelPattern::Prefix("sport.".into())
                ],
                "{name}"
            );
            assert!(grant.allows("news") && grant.allows("sport.f1"), "{name}");
            assert!(!grant.allows("weather"), "{name}");
        }
        // The PKCS#1 form of the RSA key verifies the same tokens.
        let mut pkcs1 = KeySet::new();
        pkcs1
            .add_rs256_pem("rs", RSA_PUBLIC_PKCS1.as_bytes())
            .unwrap();
        assert!(verify(&rs(&claims()), &pkcs1, NOW, LEEWAY).is_ok());
        // Optional claims may be absent; a fractional NumericDate is read.
        let minimal = json!({"exp": 1_700_000_060.9, "channels": []});
        let grant = verify(&hs(&minimal), &keys, NOW, LEEWAY).unwrap();
        assert_eq!((grant.sub.as_deref(), grant.expires_at_s), (None, NOW + 60));
        assert!(!grant.allows("news"));
    }

    #[test]
    fn refused_tokens() {
        let keys = keys();
        let hs_key = EncodingKey::from_secret(HS_SECRET);
        let claims_json = claims().to_string();
        let exp = |exp: Value| json!({"exp": exp, "channels": ["news"]});
        let channels = |channels: Value| json!({"exp": NOW + 60, "channels": channels});
        let hs_valid = hs(&claims());
        let rs_valid = rs(&claims());
        let es_valid = es(&claims());
        let tampered = json!({"exp": NOW + 60, "channels": ["*"]});
        let cases: Vec<(&str, String, TokenError)> = vec![
            ("empty", String::new(), TokenError::Missing),
            (
                "too long",
                hs(&json!({"exp": NOW + 60, "channels": vec!["a"; 1000]})),
                TokenError::TooLong,
            ),
            ("one part", "abc".into(), TokenError::Malformed),
            ("two parts", "abc.def".into(), TokenError::Malformed),
            ("four parts", format!("{hs_valid}.x"), TokenError::Malformed),
            ("empty parts", "..".into(), TokenError::Malformed),
            (
                "header not base64url",
                format!("!{}", &hs_valid[1..]),
                TokenError::Malformed,
            ),
            (
                "header padded",
                hs_valid.replacen('.', "=.", 1),
                TokenError::Malformed,
            ),
            (
                "header not json",
                raw("{\"alg\":", &claims_json, "AAAA"),
                TokenError::Malformed,
            ),
            (
                "header an array",
                raw("[\"HS256\",\"hs\"]", &claims_json, "AAAA"),
                TokenError::Malformed,
            ),
            (
                "claims not json",
                raw(r#"{"alg":"HS256","kid":"hs"}"#, "exp=1", "AAAA"),
                TokenError::Malformed,
            ),
            (
                "claims a string",
                raw(r#"{"alg":"HS256","kid":"hs"}"#, "\"news\"", "AAAA"),
                TokenError::Malformed,
            ),
            (
                "signature not base64url",
                format!("{hs_valid}*"),
                TokenError::Malformed,
            ),
            (
                "kid not a string",
                raw(r#"{"alg":"HS256","kid":7}"#, &claims_json, "AAAA"),
                TokenError::Malformed,
            ),
            (
                "alg missing",
                raw(r#"{"kid":"hs"}"#, &claims_json, "AAAA"),
                TokenError::Malformed,
            ),
            (
                "missing kid",
                mint(Algorithm::HS256, None, &claims(), &hs_key),
                TokenError::MissingKid,
            ),
            (
                "unknown kid",
                mint(Algorithm::HS256, Some("nope"), &claims(), &hs_key),
                TokenError::UnknownKid,
            ),
            (
                "empty kid",
                mint(Algorithm::HS256, Some(""), &claims(), &hs_key),
                TokenError::UnknownKid,
            ),
            (
                // The classic confusion: HMAC keyed with the RSA public key,
                // presented under the RSA key's kid.
                "hs256 under an rs256 kid",
                mint(
                    Algorithm::HS256,
                    Some("rs"),
                    &claims(),
                    &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
                ),
                TokenError::AlgorithmMismatch,
            ),
            (
                "hs256 under an es256 kid",
                mint(
                    Algorithm::HS256,
                    Some("es"),
                    &claims(),
                    &EncodingKey::from_secret(EC_PUBLIC.as_bytes()),
                ),
                TokenError::AlgorithmMismatch,
            ),
            (
                "rs256 under an hs256 kid",
                mint(
                    Algorithm::RS256,
                    Some("hs"),
                    &claims(),
                    &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
                ),
                TokenError::AlgorithmMismatch,
            ),
            (
                "hs384 under an hs256 kid",
                mint(Algorithm::HS384, Some("hs"), &claims(), &hs_key),
                TokenError::AlgorithmMismatch,
            ),
            (
                "alg none, no signature",
                raw(r#"{"alg":"none","kid":"hs"}"#, &claims_json, ""),
                TokenError::AlgorithmMismatch,
            ),
            (
                "alg none, with the valid signature",
                format!(
                    "{}.{}",
                    b64(r#"{"alg":"none","kid":"hs"}"#),
                    hs_valid.split_once('.').unwrap().1
                ),
                TokenError::AlgorithmMismatch,
            ),
            (
                "alg in lowercase",
                raw(r#"{"alg":"hs256","kid":"hs"}"#, &claims_json, "AAAA"),
                TokenError::AlgorithmMismatch,
            ),
            (
                "crit",
                signed_raw(
                    r#"{"alg":"HS256","kid":"hs","crit":["b64"],"b64":false}"#,
                    &claims_json,
                ),
                TokenError::UnsupportedCritical,
            ),
            (
                "hs256 claims changed",
                with_claims(&hs_valid, &tampered),
                TokenError::BadSignature,
            ),
            (
                "rs256 claims changed",
                with_claims(&rs_valid, &tampered),
                TokenError::BadSignature,
            ),
            (
                "es256 claims changed",
                with_claims(&es_valid, &tampered),
                TokenError::BadSignature,
            ),
            (
                "hs256 signed with another secret",
                mint(
                    Algorithm::HS256,
                    Some("hs"),
                    &claims(),
                    &EncodingKey::from_secret(HS_SECRET_NEW),
                ),
                TokenError::BadSignature,
            ),
            (
                "rs256 signature cut",
                rs_valid[..rs_valid.len() - 2].to_string(),
                TokenError::BadSignature,
            ),
            (
                "es256 signature empty",
                format!("{}.", es_valid.rsplit_once('.').unwrap().0),
                TokenError::BadSignature,
            ),
            (
                "missing exp",
                hs(&json!({"channels": ["news"]})),
                TokenError::MissingExp,
            ),
            ("exp null", hs(&exp(Value::Null)), TokenError::BadClaims),
            (
                "exp a string",
                hs(&exp(json!((NOW + 60).to_string()))),
                TokenError::BadClaims,
            ),
            ("exp negative", hs(&exp(json!(-1))), TokenError::BadClaims),
            (
                "nbf a string",
                hs(&json!({"exp": NOW + 60, "nbf": "0", "channels": ["news"]})),
                TokenError::BadClaims,
            ),
            (
                "sub a number",
                hs(&json!({"exp": NOW + 60, "sub": 7, "channels": ["news"]})),
                TokenError::BadClaims,
            ),
            (
                "missing channels",
                hs(&json!({"exp": NOW + 60})),
                TokenError::MissingChannels,
            ),
            (
                "channels a string",
                hs(&channels(json!("news"))),
                TokenError::BadClaims,
            ),
            (
                "channels a number",
                hs(&channels(json!([1]))),
                TokenError::BadClaims,
            ),
            (
                "empty pattern",
                hs(&channels(json!([""]))),
                TokenError::BadClaims,
            ),
            (
                "star inside",
                hs(&channels(json!(["news*x"]))),
                TokenError::BadClaims,
            ),
            (
                "star first",
                hs(&channels(json!(["*.news"]))),
                TokenError::BadClaims,
            ),
            (
                "two stars",
                hs(&channels(json!(["news**"]))),
                TokenError::BadClaims,
            ),
            (
                "bad charset",
                hs(&channels(json!(["a b"]))),
                TokenError::BadClaims,
            ),
            (
                "name too long",
                hs(&channels(json!(["a".repeat(129)]))),
                TokenError::BadClaims,
            ),
            (
                "one bad pattern among good ones",
                hs(&channels(json!(["news", "x y", "*"]))),
                TokenError::BadClaims,
            ),
            (
                "aud without an audience",
                hs(&json!({"exp": NOW + 60, "aud": "gateway", "channels": ["news"]})),
                TokenError::AudienceMismatch,
            ),
            (
                "aud a number",
                hs(&json!({"exp": NOW + 60, "aud": 1, "channels": ["news"]})),
                TokenError::BadClaims,
            ),
            (
                "expired",
                hs(&exp(json!(NOW - LEEWAY - 1))),
                TokenError::Expired,
            ),
            (
                "expired, fraction rounded down",
                hs(&exp(json!((NOW - LEEWAY) as f64 - 0.5))),
                TokenError::Expired,
            ),
            (
                "not yet valid",
                hs(&json!({"exp": NOW + 600, "nbf": NOW + LEEWAY + 1, "channels": ["news"]})),
                TokenError::NotYetValid,
            ),
            (
                "not yet valid, fraction rounded up",
                hs(
                    &json!({"exp": NOW + 600, "nbf": (NOW + LEEWAY) as f64 + 0.5, "channels": ["news"]}),
                ),
                TokenError::NotYetValid,
            ),
            (
                // Claim types are checked before the clock.
                "expired with bad channels",
                hs(&json!({"exp": 1, "channels": "news"})),
                TokenError::BadClaims,
            ),
        ];
        for (name, token, want) in cases {
            assert_eq!(verify(&token, &keys, NOW, LEEWAY), Err(want), "{name}");
        }
    }

    #[test]
    fn time_boundaries() {
        let keys = keys();
        let exp = NOW + 60;
        let token = hs(&json!({"exp": exp, "nbf": NOW - 60, "channels": ["news"]}));
        let at = |now: u64, leeway: u64| verify(&token, &keys, now, leeway).map(|_| ());
        // Valid up to and including exp + leeway.
        assert_eq!(at(exp, 0), Ok(()));
        assert_eq!(at(exp + 1, 0), Err(TokenError::Expired));
        assert_eq!(at(exp + LEEWAY, LEEWAY), Ok(()));
        assert_eq!(at(exp + LEEWAY + 1, LEEWAY), Err(TokenError::Expired));
        // Valid from nbf - leeway on.
        assert_eq!(at(NOW - 60, 0), Ok(()));
        assert_eq!(at(NOW - 61, 0), Err(TokenError::NotYetValid));
        assert_eq!(at(NOW - 60 - LEEWAY, LEEWAY), Ok(()));
        assert_eq!(at(NOW - 61 - LEEWAY, LEEWAY), Err(TokenError::NotYetValid));
        // No overflow at the ends of time.
        assert_eq!(at(0, u64::MAX), Ok(()));
        assert_eq!(at(u64::MAX, u64::MAX), Ok(()));
        assert_eq!(at(u64::MAX, 0), Err(TokenError::Expired));
        let forever = hs(&json!({"exp": u64::MAX, "channels": ["news"]}));
        assert!(verify(&forever, &keys, u64::MAX, u64::MAX).is_ok());
        let huge = hs(&json!({"exp": 1e30, "channels": ["news"]}));
        assert_eq!(
            verify(&huge, &keys, NOW, 0).map(|g| g.expires_at_s),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn audience() {
        let mut keys = keys();
        keys.set_audiences(&["gateway".into(), "https://rt.example.com".into()]);
        let token = |aud: Value| hs(&json!({"exp": NOW + 60, "aud": aud, "channels": ["news"]}));
        let cases = [
            (token(json!("gateway")), Ok(())),
            (token(json!("https://rt.example.com")), Ok(())),
            (token(json!(["api", "gateway"])), Ok(())),
            (token(json!(["api", "https://rt.example.com"])), Ok(())),
            (token(json!("api")), Err(TokenError::AudienceMismatch)),
            (token(json!([])), Err(TokenError::AudienceMismatch)),
            (token(json!("Gateway")), Err(TokenError::AudienceMismatch)),
            (token(json!(["gateway", 1])), Err(TokenError::BadClaims)),
            (hs(&claims()), Err(TokenError::AudienceMismatch)),
        ];
        for (token, want) in cases {
            assert_eq!(verify(&token, &keys, NOW, 0).map(|_| ()), want, "{token}");
        }
    }

    #[test]
    fn channel_patterns() {
        // (patterns in the token, channel asked for, allowed)
        let cases: &[(&[&str], &str, bool)] = &[
            (&["news"], "news", true),
            (&["news"], "news2", false),
            (&["news"], "new", false),
            (&["news"], "news.uk", false),
            (&["news"], "NEWS", false),
            (&["news.*"], "news.uk", true),
            (&["news.*"], "news.uk.london", true),
            (&["news.*"], "news.", true),
            (&["news.*"], "news", false),
            (&["news.*"], "news2", false),
            (&["news*"], "news", true),
            (&["news*"], "news2", true),
            (&["news*"], "new", false),
            (&["*"], "anything", true),
            (&["*"], "a/b:c@d", true),
            (&["a", "b.*"], "b.x", true),
            (&["a", "b.*"], "c", false),
            (&[], "news", false),
        ];
        let keys = keys();
        for (patterns, channel, want) in cases {
            let token = hs(&json!({"exp": NOW + 60, "channels": patterns}));
            let grant = verify(&token, &keys, NOW, 0).unwrap();
            assert_eq!(grant.allows(channel), *want, "{patterns:?} {channel}");
            // Patterns read back as the token wrote them.
            let written: Vec<String> = grant.patterns().iter().map(|p| p.to_string()).collect();
            assert_eq!(&written, patterns);
        }
        // Bounds: a 128-byte name and a 128-byte prefix are fine, 129 not.
        let name = "a".repeat(128);
        assert_eq!(
            ChannelPattern::parse(&name),
            Some(ChannelPattern::Exact(name.clone()))
        );
        assert_eq!(
            ChannelPattern::parse(&format!("{name}*")),
            Some(ChannelPattern::Prefix(name.clone()))
        );
        assert_eq!(ChannelPattern::parse(&format!("{name}a")), None);
        assert_eq!(ChannelPattern::parse(&format!("{name}a*")), None);
    }

    #[test]
    fn key_rotation() {
        let old_key = EncodingKey::from_secret(HS_SECRET);
        let new_key = EncodingKey::from_secret(HS_SECRET_NEW);
        let old = mint(Algorithm::HS256, Some("2024"), &claims(), &old_key);
        let new = mint(Algorithm::HS256, Some("2025"), &claims(), &new_key);

        let mut both = KeySet::new();
        both.add_hs256("2024", HS_SECRET).unwrap();
        both.add_hs256("2025", HS_SECRET_NEW).unwrap();
        let mut new_only = KeySet::new();
        new_only.add_hs256("2025", HS_SECRET_NEW).unwrap();

        let check = |token: &str, keys: &KeySet| verify(token, keys, NOW, 0).map(|g| g.kid);
        assert_eq!(check(&old, &both), Ok("2024".into()));
        assert_eq!(check(&new, &both), Ok("2025".into()));
        assert_eq!(check(&old, &new_only), Err(TokenError::UnknownKid));
        assert_eq!(check(&new, &new_only), Ok("2025".into()));
        // A kid whose secret changed does not verify the old tokens.
        let mut reused = KeySet::new();
        reused.add_hs256("2024", HS_SECRET_NEW).unwrap();
        assert_eq!(check(&old, &reused), Err(TokenError::BadSignature));
        // No key at all.
        assert_eq!(check(&old, &KeySet::new()), Err(TokenError::UnknownKid));
    }

    #[test]
    fn key_errors() {
        let key_error = |alg: KeyAlgorithm, material: &[u8]| {
            let mut keys = keys();
            keys.add("k", alg, material)
        };
        let kid = || String::from("k");
        let cases: Vec<(&str, KeyAlgorithm, &[u8], KeyError)> = vec![
            (
                "short secret",
                KeyAlgorithm::Hs256,
                &HS_SECRET[..31],
                KeyError::SecretTooShort {
                    kid: kid(),
                    bytes: 31,
                },
            ),
            (
                "not pem",
                KeyAlgorithm::Rs256,
                b"not a key",
                KeyError::NotPem { kid: kid() },
            ),
            (
                "rsa private key",
                KeyAlgorithm::Rs256,
                RSA_PRIVATE.as_bytes(),
                KeyError::NotAPublicKey {
                    kid: kid(),
                    label: "PRIVATE KEY".into(),
                },
            ),
            (
                "ec private key",
                KeyAlgorithm::Es256,
                EC_PRIVATE.as_bytes(),
                KeyError::NotAPublicKey {
                    kid: kid(),
                    label: "PRIVATE KEY".into(),
                },
            ),
            (
                "ec key for rs256",
                KeyAlgorithm::Rs256,
                EC_PUBLIC.as_bytes(),
                KeyError::WrongKeyType {
                    kid: kid(),
                    alg: KeyAlgorithm::Rs256,
                },
            ),
            (
                "rsa key for es256",
                KeyAlgorithm::Es256,
                RSA_PUBLIC.as_bytes(),
                KeyError::WrongKeyType {
                    kid: kid(),
                    alg: KeyAlgorithm::Es256,
                },
            ),
            (
                "pkcs1 rsa key for es256",
                KeyAlgorithm::Es256,
                RSA_PUBLIC_PKCS1.as_bytes(),
                KeyError::WrongKeyType {
                    kid: kid(),
                    alg: KeyAlgorithm::Es256,
                },
            ),
            (
                "p-384 key for es256",
                KeyAlgorithm::Es256,
                EC_P384_PUBLIC.as_bytes(),
                KeyError::WrongKeyType {
                    kid: kid(),
                    alg: KeyAlgorithm::Es256,
                },
            ),
            (
                "1024-bit rsa",
                KeyAlgorithm::Rs256,
                RSA_1024_PUBLIC.as_bytes(),
                KeyError::RsaKeySize {
                    kid: kid(),
                    bits: 1024,
                },
            ),
        ];
        for (name, alg, material, want) in cases {
            let got = key_error(alg, material);
            assert_eq!(got, Err(want), "{name}");
            // Every message names the key.
            assert!(got.unwrap_err().to_string().contains("\"k\""), "{name}");
        }

        let mut keys = keys();
        assert_eq!(keys.add_hs256("", HS_SECRET), Err(KeyError::EmptyKid));
        assert_eq!(
            keys.add_es256_pem("hs", EC_PUBLIC.as_bytes()),
            Err(KeyError::DuplicateKid { kid: "hs".into() })
        );
        // A refused key leaves the set as it was.
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.algorithm("hs"), Some(KeyAlgorithm::Hs256));
        assert_eq!(keys.algorithm("rs"), Some(KeyAlgorithm::Rs256));
        assert_eq!(keys.algorithm("es"), Some(KeyAlgorithm::Es256));
        assert_eq!(keys.algorithm("k"), None);
        // Debug shows the kids and algorithms, never the secret.
        let debug = format!("{keys:?}");
        assert!(debug.contains("(\"hs\", \"HS256\")"), "{debug}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(!debug.contains("48, 49, 50"), "{debug}");

        for alg in [
            KeyAlgorithm::Hs256,
            KeyAlgorithm::Rs256,
            KeyAlgorithm::Es256,
        ] {
            assert_eq!(KeyAlgorithm::from_name(alg.name()), Some(alg));
        }
        assert_eq!(KeyAlgorithm::from_name("none"), None);
        assert_eq!(KeyAlgorithm::from_name("hs256"), None);
    }

    #[test]
    fn bearer_header() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"Bearer abc.def.ghi", Some("abc.def.ghi")),
            (b"bearer abc.def.ghi", Some("abc.def.ghi")),
            (b"BEARER abc.def.ghi", Some("abc.def.ghi")),
            (b"Bearer   abc.def.ghi  ", Some("abc.def.ghi")),
            (b" \tBearer a-b_c~d+e/f==", Some("a-b_c~d+e/f==")),
            (b"Bearer", None),
            (b"Bearer ", None),
            (b"Bearer ==", None),
            (b"Bearer a=b", None),
            (b"Bearer abc def", None),
            (b"Bearer\tabc", None),
            (b"Bearerabc", None),
            (b"Basic dXNlcjpwYXNz", None),
            (b"Bearer abc\xff", None),
            (b"", None),
        ];
        for (value, want) in cases {
            assert_eq!(bearer(value), *want, "{:?}", String::from_utf8_lossy(value));
        }
        let token = hs(&claims());
        let header = format!("Bearer {token}");
        assert_eq!(bearer(header.as_bytes()), Some(token.as_str()));
    }

    #[test]
    fn errors_are_401_with_a_reason() {
        let all = [
            TokenError::Missing,
            TokenError::TooLong,
            TokenError::Malformed,
            TokenError::MissingKid,
            TokenError::UnknownKid,
            TokenError::AlgorithmMismatch,
            TokenError::UnsupportedCritical,
            TokenError::BadSignature,
            TokenError::MissingExp,
            TokenError::MissingChannels,
            TokenError::BadClaims,
            TokenError::AudienceMismatch,
            TokenError::Expired,
            TokenError::NotYetValid,
        ];
        let mut reasons = std::collections::HashSet::new();
        for e in all {
            assert_eq!(e.status(), 401);
            assert!(!e.reason().is_empty());
            assert!(e
                .reason()
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_lowercase()));
            assert!(reasons.insert(e.reason()), "{e:?}");
            assert_eq!(e.to_string(), e.reason());
            assert!(e.www_authenticate().starts_with("Bearer"));
        }
        assert_eq!(TokenError::Missing.www_authenticate(), "Bearer");
        assert_eq!(
            TokenError::Expired.www_authenticate(),
            "Bearer error=\"invalid_token\""
        );
    }

    #[test]
    fn token_at_the_size_limit() {
        let keys = keys();
        // Pad `sub` so the token is exactly TOKEN_BYTES_MAX bytes.
        let token_with = |pad: usize| {
            hs(&json!({"exp": NOW + 60, "sub": "x".repeat(pad), "channels": ["news"]}))
        };
        let base = token_with(0).len();
        // base64 grows 4 characters per 3 bytes; find the pad that lands on
        // the limit exactly, if any, else just under it.
        let mut pad = (TOKEN_BYTES_MAX - base) * 3 / 4;
        while token_with(pad).len() > TOKEN_BYTES_MAX {
            pad -= 1;
        }
        let at_limit = token_with(pad);
        assert!(at_limit.len() > TOKEN_BYTES_MAX - 3);
        assert!(verify(&at_limit, &keys, NOW, 0).is_ok());
        let over = token_with(pad + 3);
        assert!(over.len() > TOKEN_BYTES_MAX);
        assert_eq!(verify(&over, &keys, NOW, 0), Err(TokenError::TooLong));
    }

    #[test]
    fn arbitrary_tokens_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let keys = keys();
        let seeds = [hs(&claims()), rs(&claims()), es(&claims())];
        let alphabet = b"AZaz09-_.=*{}\"\\: \xc3";
        for i in 0..3000 {
            // Mutate a few bytes of a valid token, and cut it anywhere.
            let mut buf = seeds[i % seeds.len()].clone().into_bytes();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % buf.len();
                buf[at] = alphabet[(next() as usize) % alphabet.len()];
            }
            buf.truncate((next() as usize) % (buf.len() + 1));
            let token = String::from_utf8_lossy(&buf);
            let _ = verify(&token, &keys, next(), next() % 120);
            let _ = bearer(&buf);
        }
    }
}

//! API authentication: bearer tokens, each with a scope. No I/O here; the API asks [`Auth::check`].
//!
//! Tokens are kept only as SHA-256 hashes: those from `API_TOKENS` are hashed as they are read, and a
//! config file holds hashes only, so neither memory dumps of the config nor the file itself give a
//! token away. A presented token is hashed and compared with every stored hash in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// GET endpoints: jobs, stats, queues.
    Read,
    /// Create, cancel and retry jobs (and read them: a client that submits a job waits for it).
    Write,
    /// Remote workers: claim and the lease calls.
    Worker,
    /// Everything, queue administration (pause, resume) included.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Worker, Scope::Admin];

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Worker => "worker",
            Scope::Admin => "admin",
        }
    }

    /// Whether a token of this scope may do what `needed` covers.
    pub fn grants(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Write => matches!(needed, Scope::Read | Scope::Write),
            Scope::Read => needed == Scope::Read,
            Scope::Worker => needed == Scope::Worker,
        }
    }
}

/// The SHA-256 of a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// From 64 hex digits, as a config file holds it (`printf %s "$TOKEN" | sha256sum`).
    pub fn from_hex(hex: &str) -> Option<TokenHash> {
        let bytes = hex.trim().as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

// Never show even a hash in logs or debug output.
impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// The configured tokens. Empty: the API is open.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Auth {
    tokens: Vec<(Scope, TokenHash)>,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that matches none configured.
    Invalid,
}

impl Auth {
    pub fn new(tokens: Vec<(Scope, TokenHash)>) -> Auth {
        Auth { tokens }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Parses `API_TOKENS`: `scope:token,scope:token,...`.
    pub fn parse_env(raw: &str) -> Result<Vec<(Scope, TokenHash)>, String> {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (scope, token) = entry.split_once(':').ok_or("expected scope:token entries")?;
                let scope = Scope::parse(scope.trim()).ok_or("a scope of read, write, worker or admin")?;
                let token = token.trim();
                // Short tokens can be guessed; 16 characters of a random token are the least.
                if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err("tokens of at least 16 characters without spaces");
                }
                Ok((scope, TokenHash::of(token)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(str::to_string)
    }

    /// The scopes of the token in an `Authorization` header value. Every stored hash is compared, in
    /// constant time, whatever matched first: the time taken says nothing about which token is close.
    pub fn check(&self, authorization: Option<&str>) -> Result<Vec<Scope>, Denied> {
        let token = authorization
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Missing)?;
        let presented = TokenHash::of(token);
        let mut scopes = Vec::new();
        for (scope, hash) in &self.tokens {
            if bool::from(hash.0.ct_eq(&presented.0)) {
                scopes.push(*scope);
            }
        }
        if scopes.is_empty() {
            return Err(Denied::Invalid);
        }
        Ok(scopes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grant_their_scope() {
        let auth = Auth::new(Auth::parse_env("read:rrrrrrrrrrrrrrrr, admin:aaaaaaaaaaaaaaaa").unwrap());
        assert_eq!(auth.check(Some("Bearer rrrrrrrrrrrrrrrr")), Ok(vec![Scope::Read]));
        assert_eq!(auth.check(Some("bearer aaaaaaaaaaaaaaaa")), Ok(vec![Scope::Admin]));
        assert_eq!(auth.check(Some("Bearer nope-nope-nope-nope")), Err(Denied::Invalid));
        assert_eq!(auth.check(Some("Basic cnJycg==")), Err(Denied::Missing));
        assert_eq!(auth.check(None), Err(Denied::Missing));
        assert!(Scope::Admin.grants(Scope::Worker) && Scope::Write.grants(Scope::Read));
        assert!(!Scope::Read.grants(Scope::Write) && !Scope::Worker.grants(Scope::Read));
    }

    #[test]
    fn bad_token_lists_are_refused() {
        assert!(Auth::parse_env("root:aaaaaaaaaaaaaaaa").is_err());
        assert!(Auth::parse_env("read:short").is_err());
        assert!(Auth::parse_env("aaaaaaaaaaaaaaaa").is_err());
        let hash = TokenHash::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(format!("{hash:?}"), "TokenHash(..)");
        assert!(TokenHash::from_hex("abc").is_none());
        assert_eq!(
            TokenHash::from_hex("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
            Some(TokenHash::of("test"))
        );
    }
}

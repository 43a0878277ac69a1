//! API tokens: their text form, and how a presented token is checked.
//!
//! A tenant's token is `agt_<id>_<secret>`: `id` is the token's row (a uuid in simple form), and
//! `secret` is 32 random bytes in unpadded base64url. Only the SHA-256 of the secret text is
//! stored, so a copy of the database authenticates nobody. A plain hash (no salt, no slow KDF) is
//! enough for 256 bits of entropy: there is nothing to guess.
//!
//! The id in the token finds the row; the secret is then checked by comparing hashes in constant
//! time, so neither the lookup nor the comparison tells an attacker how much of a secret was
//! right. The admin token is checked the same way: both sides are hashed first, so the comparison
//! does not even depend on the lengths.
//!
//! Randomness is the caller's (this module has no I/O): see [`NewToken::from_random`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What every tenant token starts with, so a leaked one is recognisable (secret scanners) and
/// cannot be mistaken for the admin token.
pub const PREFIX: &str = "agt_";

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// A token just made: the text to hand out once, and what to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: Uuid,
    /// `agt_<id>_<secret>`: shown to the user once, never stored.
    pub token: String,
    pub secret_sha256: Digest32,
}

impl NewToken {
    /// A token with this id and these 32 random bytes as its secret.
    pub fn from_random(id: Uuid, random: [u8; 32]) -> NewToken {
        let secret = URL_SAFE_NO_PAD.encode(random);
        NewToken { id, token: format!("{PREFIX}{}_{secret}", id.simple()), secret_sha256: sha256(secret.as_bytes()) }
    }
}

/// A presented tenant token, parsed: the row to look up and the hash to compare with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub id: Uuid,
    pub secret_sha256: Digest32,
}

/// Parses `agt_<id>_<secret>`; `None` when the text is not a tenant token at all.
pub fn parse(token: &str) -> Option<Presented> {
    let rest = token.strip_prefix(PREFIX)?;
    // The id is hex, so the first `_` ends it (the secret's base64url may hold more).
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.is_empty() {
        return None;
    }
    let id = Uuid::try_parse(id).ok()?;
    Some(Presented { id, secret_sha256: sha256(secret.as_bytes()) })
}

pub fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// Equality of two digests that looks at every byte whatever they hold.
pub fn digests_equal(a: &Digest32, b: &Digest32) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Whether `given` is the admin token `expected`, in time independent of both (they are hashed
/// to equal lengths first).
pub fn is_admin_token(given: &str, expected: &str) -> bool {
    digests_equal(&sha256(given.as_bytes()), &sha256(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_parses_back_to_its_id_and_stored_hash() {
        let id = Uuid::from_u128(0x1234);
        let t = NewToken::from_random(id, [7; 32]);
        assert!(t.token.starts_with("agt_00000000000000000000000000001234_"), "{}", t.token);
        assert_eq!(t.token.len(), 4 + 32 + 1 + 43);
        let p = parse(&t.token).expect("parses");
        assert_eq!(p, Presented { id, secret_sha256: t.secret_sha256 });
        assert!(digests_equal(&p.secret_sha256, &t.secret_sha256));
    }

    #[test]
    fn secrets_with_underscores_parse_and_a_changed_secret_does_not_match() {
        // 0xff bytes encode to `_` in base64url.
        let t = NewToken::from_random(Uuid::from_u128(1), [0xff; 32]);
        assert!(t.token[37..].contains('_'));
        assert_eq!(parse(&t.token).unwrap().secret_sha256, t.secret_sha256);
        let mut wrong = t.token.clone();
        wrong.pop();
        wrong.push('A');
        assert!(!digests_equal(&parse(&wrong).unwrap().secret_sha256, &t.secret_sha256));
    }

    #[test]
    fn what_is_not_a_tenant_token_does_not_parse() {
        for s in ["", "agt_", "agt_abc_def", "test-admin-token", "agt_00000000000000000000000000001234_", "Agt_x"] {
            assert_eq!(parse(s), None, "{s:?}");
        }
        assert_eq!(parse("agt_zz000000000000000000000000001234_secret"), None);
    }

    #[test]
    fn the_admin_token_matches_only_itself() {
        assert!(is_admin_token("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cret!", "S3cret", "agt_s3cret"] {
            assert!(!is_admin_token(wrong, "s3cret"), "{wrong:?}");
        }
    }
}

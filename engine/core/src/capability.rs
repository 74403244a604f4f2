//! Capability URLs: what a BMC (which cannot send a token) fetches an instance's artifact
//! with. A capability names one deployment of one instance and an expiry, and carries an
//! HMAC-SHA256 of them under the engine's secret key, so it cannot be forged or moved to
//! another instance; it is dead once that deployment ends (the instance is undeployed,
//! redeployed or rolled) or the expiry passes.
//!
//! `/v1/cap/{tier}/{index}/{deployment}.{expires-secs}.{mac}` is the descriptor; the parts
//! lie under it, `.../{role}`, so a driver that may read its deployment's artifact may read
//! them.

use ring::hmac;

/// How long a capability stays valid. Long enough for a BMC that reads its virtual media
/// again at a reboot days after the deployment; the deployment's end kills it sooner.
pub const TTL_SECS: u64 = 7 * 24 * 3600;

/// Signs and checks capabilities with one key.
pub struct Capabilities {
    key: hmac::Key,
}

/// Why a capability does not admit a request. Callers answer every case alike (404), so a
/// prober learns nothing; the cases exist for the log and the tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not of the capability's shape.
    Malformed,
    /// The MAC does not match: forged, or altered.
    Forged,
    /// Past its expiry.
    Expired,
}

fn message(tier: &str, index: u32, deployment: u64, expires: u64) -> String {
    format!("mint-capability-v1\n{tier}\n{index}\n{deployment}\n{expires}")
}

impl Capabilities {
    /// Capabilities under the 32-byte secret `key`.
    pub fn new(key: &[u8; 32]) -> Capabilities {
        Capabilities {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The capability token for `deployment` of `tier/index`, valid until `expires`
    /// (seconds since the Unix epoch).
    pub fn token(&self, tier: &str, index: u32, deployment: u64, expires: u64) -> String {
        let tag = hmac::sign(
            &self.key,
            message(tier, index, deployment, expires).as_bytes(),
        );
        format!("{deployment}.{expires}.{}", hex::encode(tag.as_ref()))
    }

    /// The credential the engine presents to node `node`'s agent for the node's enrollment
    /// `generation`: derived, not stored, so it dies when the node joins again. Another
    /// message domain than capabilities', so one cannot stand for the other.
    pub fn agent_credential(&self, node: &str, generation: u64) -> String {
        let tag = hmac::sign(
            &self.key,
            format!("mint-agent-credential-v1\n{node}\n{generation}").as_bytes(),
        );
        format!("mint_ea_{}", hex::encode(tag.as_ref()))
    }

    /// The deployment a token names, if its MAC is this key's and it has not expired at
    /// `now` (seconds since the Unix epoch). The MAC is checked in constant time.
    pub fn check(&self, tier: &str, index: u32, token: &str, now: u64) -> Result<u64, Refused> {
        let mut parts = token.splitn(3, '.');
        let (Some(d), Some(e), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Refused::Malformed);
        };
        let (Ok(deployment), Ok(expires), Ok(tag)) =
            (d.parse::<u64>(), e.parse::<u64>(), hex::decode(mac))
        else {
            return Err(Refused::Malformed);
        };
        hmac::verify(
            &self.key,
            message(tier, index, deployment, expires).as_bytes(),
            &tag,
        )
        .map_err(|_| Refused::Forged)?;
        if expires <= now {
            return Err(Refused::Expired);
        }
        Ok(deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_tier_index_deployment_and_expiry() {
        let caps = Capabilities::new(&[7; 32]);
        let t = caps.token("web", 2, 5, 1000);
        assert_eq!(caps.check("web", 2, &t, 999), Ok(5));
        assert_eq!(caps.check("web", 2, &t, 1000), Err(Refused::Expired));
        assert_eq!(
            caps.check("web", 3, &t, 999),
            Err(Refused::Forged),
            "another instance"
        );
        assert_eq!(
            caps.check("db", 2, &t, 999),
            Err(Refused::Forged),
            "another tier"
        );
        let later = t.replacen("1000", "9999", 1);
        assert_eq!(
            caps.check("web", 2, &later, 999),
            Err(Refused::Forged),
            "a stretched expiry"
        );
        let other_deployment = t.replacen("5.", "6.", 1);
        assert_eq!(
            caps.check("web", 2, &other_deployment, 999),
            Err(Refused::Forged)
        );
        assert_eq!(
            Capabilities::new(&[8; 32]).check("web", 2, &t, 999),
            Err(Refused::Forged),
            "another engine's key"
        );
        assert_eq!(
            caps.check("web", 2, "garbage", 999),
            Err(Refused::Malformed)
        );
    }
}

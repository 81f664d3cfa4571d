//! The CRL's list of revoked certificates, kept in memory and encoded straight to DER.
//!
//! A CRL can list hundreds of thousands of serials (every revoked certificate until it expires),
//! and it is rebuilt after every revocation. Building it through a general ASN.1 writer cost
//! about 7 µs and several allocations per serial on every rebuild; here each entry is a few
//! bytes appended to one buffer. The header and extensions (issuer name, algorithm, times,
//! authority key identifier, CRL number) still come from rcgen: it signs a CRL without entries,
//! whose to-be-signed part is split around where the entries go, and the whole is signed again
//! with the issuer's key.

use std::collections::BTreeMap;

use super::MintError;
use super::der::{SEQUENCE, element, integer, signed, time, tlv};

/// A revoked certificate: when it was revoked and when it expires (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Revocation time.
    pub revoked_at: i64,
    /// The certificate's notAfter: the entry leaves the CRL after it.
    pub expires_at: i64,
}

/// Revoked serials (big-endian bytes, as in the certificate), in serial order.
#[derive(Debug, Default)]
pub struct RevokedSet {
    entries: BTreeMap<Box<[u8]>, RevokedEntry>,
}

impl RevokedSet {
    /// Adds (or keeps the earlier revocation of) a serial given in hex.
    pub fn insert_hex(&mut self, serial_hex: &str, entry: RevokedEntry) -> Result<(), MintError> {
        let bytes = parse_hex(serial_hex).ok_or_else(|| {
            MintError::Signing(format!("stored serial {serial_hex:?} is not hex"))
        })?;
        self.entries
            .entry(bytes.into_boxed_slice())
            .and_modify(|e| e.revoked_at = e.revoked_at.min(entry.revoked_at))
            .or_insert(entry);
        Ok(())
    }

    /// Drops serials expired at `now`: an expired certificate is refused anyway.
    pub fn drop_expired(&mut self, now: i64) {
        self.entries.retain(|_, e| e.expires_at > now);
    }

    /// How many serials are listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no serial is listed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The DER `revokedCertificates` entries, concatenated (without the outer SEQUENCE).
    pub(super) fn encode_entries(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 48);
        let mut entry = Vec::with_capacity(48);
        for (serial, e) in &self.entries {
            entry.clear();
            integer(&mut entry, serial);
            time(&mut entry, e.revoked_at);
            entry.extend_from_slice(REASON_CESSATION_OF_OPERATION);
            tlv(&mut out, SEQUENCE, &entry);
        }
        out
    }
}

/// The `crlExtensions` field's tag.
const EXTENSIONS_TAG: u8 = 0xa0;

/// `crlEntryExtensions`: reasonCode (2.5.29.21) = cessationOfOperation (5), as RFC 5280 §5.3.1
/// suggests for a credential whose work is over.
const REASON_CESSATION_OF_OPERATION: &[u8] = &[
    0x30, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x1d, 0x15, 0x04, 0x03, 0x0a, 0x01, 0x05,
];

pub use super::der::parse_hex;

/// Splits a signed CRL without entries into what goes before the entries in its to-be-signed
/// part, what goes after them (the `crlExtensions`), and its signature algorithm.
fn split_template(der: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (SEQUENCE, _, outer) = element(der)? else {
        return None;
    };
    let outer = &der[outer];
    let (SEQUENCE, tbs_len, tbs) = element(outer)? else {
        return None;
    };
    let tbs_content = &outer[tbs];
    let (SEQUENCE, alg_len, _) = element(&outer[tbs_len..])? else {
        return None;
    };
    let algorithm = &outer[tbs_len..tbs_len + alg_len];
    let mut at = 0;
    while at < tbs_content.len() {
        let (tag, len, _) = element(&tbs_content[at..])?;
        if tag == EXTENSIONS_TAG {
            return Some((&tbs_content[..at], &tbs_content[at..], algorithm));
        }
        at += len;
    }
    None
}

/// Assembles and signs the CRL: `template` is the same CRL signed without entries, `sign` signs
/// with the key that signed it.
pub(super) fn assemble(
    template: &[u8],
    entries: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, MintError>,
) -> Result<Vec<u8>, MintError> {
    let (head, extensions, algorithm) = split_template(template)
        .ok_or_else(|| MintError::Signing("unexpected CRL template encoding".into()))?;
    let mut tbs_content = Vec::with_capacity(head.len() + entries.len() + extensions.len() + 8);
    tbs_content.extend_from_slice(head);
    // RFC 5280 §5.1.2.6: with no revoked certificate, the list is absent.
    if !entries.is_empty() {
        tlv(&mut tbs_content, SEQUENCE, entries);
    }
    tbs_content.extend_from_slice(extensions);
    let mut tbs = Vec::with_capacity(tbs_content.len() + 8);
    tlv(&mut tbs, SEQUENCE, &tbs_content);
    drop(tbs_content);
    let signature = sign(&tbs)?;
    Ok(signed(tbs, algorithm, &signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_must_be_hex() {
        let mut s = RevokedSet::default();
        let e = RevokedEntry {
            revoked_at: 1,
            expires_at: 2,
        };
        assert!(s.insert_hex("zz", e).is_err());
        assert!(s.insert_hex("abc", e).is_err());
        s.insert_hex("0a", e).unwrap();
        s.insert_hex("0a", RevokedEntry { revoked_at: 0, ..e })
            .unwrap();
        assert_eq!(s.len(), 1);
        s.drop_expired(2);
        assert!(s.is_empty());
    }
}

//! The few DER encodings the CA writes itself, on paths that run for every credential or every
//! revocation (leaf certificates, CRL entries). Each writes straight into one buffer: no
//! general ASN.1 writer, no intermediate allocations.

/// SEQUENCE.
pub(super) const SEQUENCE: u8 = 0x30;
/// INTEGER.
pub(super) const INTEGER: u8 = 0x02;
/// BIT STRING.
pub(super) const BIT_STRING: u8 = 0x03;
/// OCTET STRING.
pub(super) const OCTET_STRING: u8 = 0x04;
/// OBJECT IDENTIFIER.
pub(super) const OID: u8 = 0x06;
/// UTCTime.
const UTC_TIME: u8 = 0x17;
/// GeneralizedTime.
const GENERALIZED_TIME: u8 = 0x18;

/// Appends a DER length.
pub(super) fn length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (be.len() - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
}

/// Appends a tag and the DER length `len`: the header of an element whose content follows.
pub(super) fn header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    length(out, len);
}

/// The size of a whole element (tag, length, content) with `len` bytes of content.
pub(super) fn size(len: usize) -> usize {
    let length_bytes = if len < 0x80 {
        1
    } else {
        1 + (usize::BITS - len.leading_zeros()).div_ceil(8) as usize
    };
    1 + length_bytes + len
}

/// Appends tag, length and `content`.
pub(super) fn tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    header(out, tag, content.len());
    out.extend_from_slice(content);
}

/// Appends a positive INTEGER in minimal encoding (as rcgen encodes the certificate's serial,
/// so relying parties match them byte for byte).
pub(super) fn integer(out: &mut Vec<u8>, magnitude: &[u8]) {
    let skip = magnitude.iter().take_while(|b| **b == 0).count();
    let m = &magnitude[skip..];
    out.push(INTEGER);
    match m.first() {
        None => out.extend_from_slice(&[1, 0]),
        Some(b) if *b >= 0x80 => {
            length(out, m.len() + 1);
            out.push(0);
            out.extend_from_slice(m);
        }
        Some(_) => {
            length(out, m.len());
            out.extend_from_slice(m);
        }
    }
}

/// Appends a time as RFC 5280 §4.1.2.5 wants: UTCTime through 2049, GeneralizedTime after.
pub(super) fn time(out: &mut Vec<u8>, unix: i64) {
    let t = time::OffsetDateTime::from_unix_timestamp(unix.max(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = t.year().unsigned_abs();
    let utc = (1950..2050).contains(&t.year());
    let fields = [
        year / 100,
        year % 100,
        u32::from(u8::from(t.month())),
        u32::from(t.day()),
        u32::from(t.hour()),
        u32::from(t.minute()),
        u32::from(t.second()),
    ];
    // UTCTime drops the century: YYMMDDHHMMSSZ; GeneralizedTime is YYYYMMDDHHMMSSZ.
    let (tag, fields) = if utc {
        (UTC_TIME, &fields[1..])
    } else {
        (GENERALIZED_TIME, &fields[..])
    };
    out.push(tag);
    length(out, fields.len() * 2 + 1);
    for v in fields {
        out.extend_from_slice(&[b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8]);
    }
    out.push(b'Z');
}

/// One DER element at the start of `der`: (tag, whole element length, content range).
pub(super) fn element(der: &[u8]) -> Option<(u8, usize, std::ops::Range<usize>)> {
    let tag = *der.first()?;
    let first = *der.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = der
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (2 + n, len)
    };
    let end = header.checked_add(len)?;
    (end <= der.len()).then_some((tag, end, header..end))
}

/// Appends a signed object: SEQUENCE { `tbs`, `algorithm`, BIT STRING `signature` } (the shape
/// of certificates and CRLs alike). `tbs` is the whole to-be-signed element.
pub(super) fn signed(tbs: Vec<u8>, algorithm: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut content = tbs;
    content.extend_from_slice(algorithm);
    header(&mut content, BIT_STRING, signature.len() + 1);
    content.push(0);
    content.extend_from_slice(signature);
    let mut der = Vec::with_capacity(content.len() + 4);
    tlv(&mut der, SEQUENCE, &content);
    der
}

/// The elements of a DER SEQUENCE's content, each whole (tag, length and content).
pub(super) fn elements(mut content: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (_, len, _) = element(content)?;
        let (first, rest) = content.split_at(len);
        out.push(first);
        content = rest;
    }
    Some(out)
}

/// Lowercase hex of `bytes` (serials, fingerprints, digests).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A serial's bytes from its hex form (as stored and as the API reports it); at most 32 bytes.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_minimal_and_positive() {
        let enc = |b: &[u8]| {
            let mut v = Vec::new();
            integer(&mut v, b);
            v
        };
        assert_eq!(enc(&[0x40, 1]), [2, 2, 0x40, 1]);
        assert_eq!(enc(&[0x80]), [2, 2, 0, 0x80]);
        assert_eq!(enc(&[0, 0, 5]), [2, 1, 5]);
        assert_eq!(enc(&[0]), [2, 1, 0]);
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let enc = |t: i64| {
            let mut v = Vec::new();
            time(&mut v, t);
            v
        };
        // 2026-11-23T01:02:03Z
        assert_eq!(enc(1_795_395_723), b"\x17\x0d261123010203Z");
        // 2050-01-01T00:00:00Z
        assert_eq!(enc(2_524_608_000), b"\x18\x0f20500101000000Z");
    }

    #[test]
    fn long_lengths() {
        let mut v = Vec::new();
        length(&mut v, 300);
        assert_eq!(v, [0x82, 1, 44]);
        for len in [0, 1, 127, 128, 255, 256, 65_535, 65_536] {
            let mut v = Vec::new();
            header(&mut v, SEQUENCE, len);
            assert_eq!(size(len), v.len() + len, "{len}");
        }
        assert_eq!(element(&[0x30, 0x82, 0, 1, 9]), Some((0x30, 5, 4..5)));
        assert_eq!(element(&[0x30, 0x82, 0, 2, 9]), None, "truncated");
    }
}

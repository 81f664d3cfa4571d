//! The one place broker errors become `tonic::Status`.
//!
//! Attestation failures → `Unauthenticated`; mapping and policy denials → `PermissionDenied`;
//! bad input → `InvalidArgument` (over a size limit → `ResourceExhausted`, naming the limit);
//! CA trouble → `Unavailable`. The caller gets a fixed, safe message; the detail goes to the
//! audit log (denials) or the error log (internal failures).

use tonic::Status;

use crate::attest::AttestError;
use crate::broker::BrokerError;
use crate::ca::MintError;
use crate::policy::{MappingError, PolicyError};

/// Maps a broker error to the status the caller sees.
pub fn to_status(err: &BrokerError) -> Status {
    match err {
        BrokerError::InvalidArgument { .. } | BrokerError::BadRequest { .. } => {
            Status::invalid_argument(err.to_string())
        }
        BrokerError::Attest(AttestError::NoEvidence) => Status::unauthenticated(
            "no evidence: call over the broker's Unix socket or present a credential",
        ),
        // Token problems describe the caller's own token, so they are safe and useful to show.
        BrokerError::Attest(e @ AttestError::TokenTooLarge { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        BrokerError::Attest(e @ (AttestError::Token(_) | AttestError::CertificateInvalid(_))) => {
            Status::unauthenticated(e.to_string())
        }
        BrokerError::Attest(AttestError::KeysUnavailable(detail)) => {
            tracing::warn!(error = %detail, "cannot verify evidence now");
            Status::unavailable("cannot verify the evidence now; retry later")
        }
        BrokerError::Attest(_) => Status::unauthenticated("attestation failed"),
        BrokerError::Mapping(e @ MappingError::NoMapping { .. }) => {
            Status::permission_denied(e.to_string())
        }
        BrokerError::Mapping(MappingError::NotMapped { .. }) => {
            Status::permission_denied(err.to_string())
        }
        BrokerError::Mapping(MappingError::UnsafeClaimValue { .. }) => {
            Status::permission_denied("identity mapping refused an attested claim")
        }
        BrokerError::Policy(PolicyError::Denied { .. }) => {
            Status::permission_denied("denied by policy")
        }
        BrokerError::Policy(PolicyError::Request(_)) => {
            Status::permission_denied("request could not be authorized")
        }
        BrokerError::TaskNotFound(_) | BrokerError::LeaseNotFound(_) => {
            Status::not_found(err.to_string())
        }
        BrokerError::NotTaskOwner { .. } => Status::permission_denied(err.to_string()),
        BrokerError::LimitExceeded(_) => Status::resource_exhausted(err.to_string()),
        BrokerError::TaskNotActive { .. }
        | BrokerError::TaskEnding { .. }
        | BrokerError::TaskEnded { .. } => Status::failed_precondition(err.to_string()),
        BrokerError::StreamMisuse(_) => Status::invalid_argument(err.to_string()),
        BrokerError::Withdrawn(_) | BrokerError::Locked { .. } => {
            Status::permission_denied(err.to_string())
        }
        BrokerError::ShuttingDown(_) => Status::unavailable(err.to_string()),
        BrokerError::Store(e) => {
            tracing::error!(error = %e, "store failure");
            Status::unavailable("the broker cannot record credentials now; retry later")
        }
        BrokerError::Mint(m) => match m {
            MintError::CsrTooLarge { .. } => Status::resource_exhausted(m.to_string()),
            MintError::CsrMalformed(_)
            | MintError::CsrSignature
            | MintError::CsrRequestsCa
            | MintError::CsrUnsupportedKey(_) => Status::invalid_argument(m.to_string()),
            MintError::CaExpired => {
                tracing::error!(error = %m, "cannot mint: CA expired");
                Status::unavailable("the broker's CA cannot issue credentials now")
            }
            MintError::Signing(_) => {
                tracing::error!(error = %m, "signing failed");
                Status::internal("signing failed")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdError;
    use tonic::Code;

    #[test]
    fn codes() {
        let rows: Vec<(BrokerError, Code)> = vec![
            (
                BrokerError::InvalidArgument {
                    field: "ttl_seconds",
                    source: IdError::ZeroTtl,
                },
                Code::InvalidArgument,
            ),
            (
                BrokerError::Attest(AttestError::NoEvidence),
                Code::Unauthenticated,
            ),
            (
                BrokerError::Mapping(MappingError::NoMapping { attestor: "unix" }),
                Code::PermissionDenied,
            ),
            (
                BrokerError::Mint(MintError::CsrTooLarge { size: 1, max: 0 }),
                Code::ResourceExhausted,
            ),
            (
                BrokerError::Mint(MintError::CsrSignature),
                Code::InvalidArgument,
            ),
            (BrokerError::Mint(MintError::CaExpired), Code::Unavailable),
            (
                BrokerError::Mint(MintError::Signing("x".into())),
                Code::Internal,
            ),
        ];
        for (err, code) in rows {
            assert_eq!(to_status(&err).code(), code, "{err:?}");
        }
    }

    #[test]
    fn unsafe_claim_detail_is_not_shown_to_caller() {
        let s = to_status(&BrokerError::Mapping(MappingError::UnsafeClaimValue {
            claim: "repo".into(),
            reason: "secret detail".into(),
        }));
        assert!(!s.message().contains("secret detail"));
    }
}

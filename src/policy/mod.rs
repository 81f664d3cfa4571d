//! Deciding who gets which identity: identity mapping from attested claims to SPIFFE IDs.
//!
//! Deny by default: an identity no rule maps gets nothing.

pub mod cedar;
pub mod mapping;

pub use cedar::{PolicyEngine, PolicyError};
pub use mapping::{Mapper, MappingError};

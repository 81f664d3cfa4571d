//! Deciding who gets which identity: identity mapping from attested claims to SPIFFE IDs.
//!
//! Deny by default: an identity no rule maps gets nothing.

pub mod mapping;

pub use mapping::{Mapper, MappingError};

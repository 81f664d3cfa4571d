//! Decoding of every `ephemera.v1` request message from untrusted bytes: never panics.
#![no_main]

use ephemera::api::pb::v1::*;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let _ = match which % 18 {
        0 => BeginTaskRequest::decode(body).map(|_| ()),
        1 => KeepAliveRequest::decode(body).map(|_| ()),
        2 => EndTaskRequest::decode(body).map(|_| ()),
        3 => MintX509SvidRequest::decode(body).map(|_| ()),
        4 => MintJwtSvidRequest::decode(body).map(|_| ()),
        5 => ListTasksRequest::decode(body).map(|_| ()),
        6 => ListLeasesRequest::decode(body).map(|_| ()),
        7 => GetLeaseRequest::decode(body).map(|_| ()),
        8 => RevokeLeaseRequest::decode(body).map(|_| ()),
        9 => RevokeTaskRequest::decode(body).map(|_| ()),
        10 => RevokeIdentityRequest::decode(body).map(|_| ()),
        11 => ReloadPolicyRequest::decode(body).map(|_| ()),
        12 => CreateJoinTokenRequest::decode(body).map(|_| ()),
        13 => WatchRequest::decode(body).map(|_| ()),
        14 => IntrospectRequest::decode(body).map(|_| ()),
        15 => ephemera::api::pb::workload::X509svidRequest::decode(body).map(|_| ()),
        16 => ephemera::api::pb::workload::JwtsvidRequest::decode(body).map(|_| ()),
        _ => ephemera::api::pb::workload::ValidateJwtsvidRequest::decode(body).map(|_| ()),
    };
});

"""Standard Python clients against a running broker, unmodified and with default options.

- py-spiffe (PyPI `spiffe`) reads SPIFFE_ENDPOINT_SOCKET and fetches the X.509 context, a
  JWT-SVID and both bundle kinds from the Workload API socket;
- grpcio (C-core) asks grpc.health.v1 on both Unix sockets, and lists services with
  grpc.reflection.v1alpha (grpcio-reflection's client protos);
- authlib verifies the JWT-SVID against the broker's published JWKS.

Prints one JSON object; tests/interop.rs checks what it says with its own verifiers.
Usage: python_clients.py BROKER_SOCKET WORKLOAD_SOCKET AUDIENCE JWKS_URL
"""

import base64
import json
import sys
import urllib.request
import warnings

import grpc
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from spiffe import WorkloadApiClient


def der_b64(cert):
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def health(path, services):
    """Status of each service, by name, as grpc.health.v1.Health/Check answers over `path`."""
    out = {}
    with grpc.insecure_channel("unix:" + path) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                out[service] = "error: " + e.code().name
    return out


def reflected_services(path):
    """The services grpc.reflection.v1alpha lists over `path`."""
    with grpc.insecure_channel("unix:" + path) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([request]), timeout=10)
        for reply in replies:
            return sorted(s.name for s in reply.list_services_response.service)
    return []


def main():
    broker_socket, workload_socket, audience, jwks_url = sys.argv[1:5]
    client = WorkloadApiClient()  # SPIFFE_ENDPOINT_SOCKET, as every SPIFFE client reads it
    try:
        ctx = client.fetch_x509_context()
        svid = ctx.default_svid
        td = svid.spiffe_id.trust_domain
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
        jwt = client.fetch_jwt_svid(audience={audience})
        x509_bundles = client.fetch_x509_bundles()
        jwt_bundles = client.fetch_jwt_bundles()
        result = {
            "x509": {
                "spiffe_id": str(svid.spiffe_id),
                "chain": [der_b64(c) for c in svid.cert_chain],
                "bundle": [der_b64(c) for c in bundle.x509_authorities],
            },
            "jwt": {"spiffe_id": str(jwt.spiffe_id), "token": jwt.token},
            "x509_bundle_domains": sorted(str(b.trust_domain) for b in x509_bundles.bundles),
            "jwt_bundle_domains": sorted(str(b.trust_domain) for b in jwt_bundles.bundles),
        }
    finally:
        client.close()
    # authlib, as a relying party would: the JWKS from the broker's HTTP listener.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from authlib.jose import JsonWebKey, JsonWebToken

        with urllib.request.urlopen(jwks_url, timeout=10) as r:
            keys = JsonWebKey.import_key_set(json.load(r))
        claims = JsonWebToken(["ES256"]).decode(result["jwt"]["token"], keys)
        claims.validate()
    result["authlib"] = {"sub": claims["sub"], "aud": claims["aud"]}
    result["health"] = {
        "broker": health(
            broker_socket,
            ["", "ephemera.v1.Broker", "ephemera.v1.Admin", "ephemera.v1.Revocations"],
        ),
        "workload": health(
            workload_socket,
            ["", "SpiffeWorkloadAPI", "envoy.service.secret.v3.SecretDiscoveryService"],
        ),
    }
    result["reflection"] = {
        "broker": reflected_services(broker_socket),
        "workload": reflected_services(workload_socket),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

// Standard Node.js clients against a running broker, unmodified and with default options:
// @grpc/grpc-js calls the SPIFFE Workload API (FetchJWTSVID, and ValidateJWTSVID on the token it
// got) over the Unix socket, and jose verifies the JWT-SVID against the broker's published JWKS.
// Prints one JSON object; tests/interop.rs checks it.
//
// Usage: node node_clients.mjs WORKLOAD_SOCKET PROTO_DIR JWKS_URL ISSUER AUDIENCE

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { createLocalJWKSet, jwtVerify } from "jose";

const [workloadSocket, protoDir, jwksUrl, issuer, audience] = process.argv.slice(2);

const definition = protoLoader.loadSync("workload.proto", {
  includeDirs: [protoDir],
  keepCase: true,
});
const { SpiffeWorkloadAPI } = grpc.loadPackageDefinition(definition);
const client = new SpiffeWorkloadAPI(
  `unix://${workloadSocket}`,
  grpc.credentials.createInsecure(),
);

const metadata = () => {
  const m = new grpc.Metadata();
  m.set("workload.spiffe.io", "true");
  return m;
};

const call = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata(), { deadline: Date.now() + 10_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    ),
  );

const fetched = await call("FetchJWTSVID", { audience: [audience] });
const token = fetched.svids[0].svid;
const validated = await call("ValidateJWTSVID", { audience, svid: token });

const jwks = await (await fetch(jwksUrl)).json();
const { payload, protectedHeader } = await jwtVerify(token, createLocalJWKSet(jwks), {
  issuer,
  audience,
  algorithms: ["ES256"],
});

let missingHeader;
try {
  await new Promise((resolve, reject) =>
    client.FetchJWTSVID({ audience: [audience] }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    ),
  );
  missingHeader = "OK";
} catch (err) {
  missingHeader = grpc.status[err.code];
}

client.close();
console.log(
  JSON.stringify({
    spiffe_id: fetched.svids[0].spiffe_id,
    token,
    validated_spiffe_id: validated.spiffe_id,
    jose: { sub: payload.sub, aud: payload.aud, alg: protectedHeader.alg, kid: protectedHeader.kid },
    without_security_header: missingHeader,
  }),
);

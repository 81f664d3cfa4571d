#!/usr/bin/env python3
"""Splits a profile of the broker's threads by component.

Each sample of a broker thread is counted under the innermost frame of its stack that belongs to
a component below (a sample in malloc called from the audit event counts as the audit event's);
samples of the SQLite threads count as the store's. Record with call graphs, for example:

    perf record -F 499 --call-graph dwarf,16384 -o perf.data -- \\
        ./target/release/ephemera-bench --only issuance --case tcp:jwt
    perf script -i perf.data -F comm,ip,sym,dso | python3 tools/perf-breakdown.py

Thread names are the in-process broker's (`ephemera-broker`, `sqlx-sqlite-worker-N`); pass
other prefixes as arguments for a broker process (`ephemera serve` runs `tokio-runtime-worker`).
"""

import collections
import re
import sys

# (component, pattern on the frame's name with generic arguments removed), first match wins.
COMPONENTS = [
    ("ECDSA signature (ring)", r"EcdsaKeyPair.*::sign|ring::ec::suite_b::ecdsa::signing"),
    ("CSR signature check (ECDSA verify, ring)",
     r"ring::signature|ring::ec::suite_b::ecdsa::verification"),
    ("CSR parsing (x509-parser, rcgen)", r"x509_parser::|der_parser::|asn1_rs::|rcgen::"),
    ("certificate encoding (template)", r"ephemera::ca::x509|ephemera::ca::der"),
    ("JWT encoding", r"ephemera::ca::jwt"),
    ("audit event (JSON line, write)", r"Audit::emit"),
    ("Cedar decision", r"PolicyEngine::decide"),
    ("attestation (verified-token cache)", r"Attestors::attest"),
    ("lease writer task (group commit)", r"ephemera::store::lease_writer"),
    ("metrics", r"^<?(metrics|metrics_exporter_prometheus)::"),
    ("rest of the mint handler", r"ephemera::(broker|api::broker|quota|lease)::"),
    ("tonic service, protobuf", r"^<?(tonic|tonic_prost|prost|tower|axum)::|ephemera::api::pb"),
    ("TLS records (rustls)", r"^<?(tokio_rustls|rustls)::"),
    ("HTTP/2 (h2, hyper)", r"^<?(h2|hyper|hyper_util|http)::"),
    ("socket reads and writes", r"^<?(tokio::net|mio::net|std::net|tokio::io::poll_evented)"),
    ("tokio scheduler: park, wake, I/O driver", r"^<?(tokio|mio)::"),
]
STORE_THREADS = ("sqlx-sqlite",)
PATTERNS = [(name, re.compile(p)) for name, p in COMPONENTS]
GENERICS = re.compile(r"(?<=[\w\]])<[^<>]*>")


def plain(symbol):
    """`poll<h2::Foo<T>>` → `poll`: the name without generic arguments."""
    previous = None
    while previous != symbol:
        previous, symbol = symbol, GENERICS.sub("", symbol)
    return symbol


def component(thread, frames):
    if thread.startswith(STORE_THREADS):
        return "SQLite store threads"
    for frame in frames:
        for name, pattern in PATTERNS:
            if pattern.search(frame):
                return name
    return "other"


def main():
    prefixes = tuple(sys.argv[1:]) or ("ephemera-broke",)
    prefixes += STORE_THREADS
    counts, in_kernel = collections.Counter(), collections.Counter()
    thread, frames, kernel_leaf = None, [], False

    def flush():
        if thread is not None and thread.startswith(prefixes):
            name = component(thread, frames)
            counts[name] += 1
            in_kernel[name] += kernel_leaf

    for line in sys.stdin:
        if not line.strip():
            flush()
            thread, frames, kernel_leaf = None, [], False
        elif not line[0].isspace():
            thread, frames = line.split()[0], []
        else:
            parts = line.split(None, 1)
            if len(parts) == 2:
                if not frames:
                    kernel_leaf = "[kernel.kallsyms]" in parts[1]
                frames.append(plain(parts[1]))
    flush()
    total = sum(counts.values())
    if not total:
        sys.exit("no samples of the broker's threads (thread name prefixes: %s)" % ", ".join(prefixes))
    print(f"{total} samples of the broker's threads, "
          f"{100 * sum(in_kernel.values()) / total:.1f}% of them in the kernel")
    for name, n in counts.most_common():
        kernel = f"  ({100 * in_kernel[name] / total:.1f}% in the kernel)" if in_kernel[name] else ""
        print(f"{100 * n / total:5.1f}%  {name}{kernel}")


if __name__ == "__main__":
    main()

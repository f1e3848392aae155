"""Time of one `engine.read` through the local splice and as a remote request simulated here
(`remote="local"`: serialise the request, deserialise it with this package hidden, run it), on
the embedded model with its shipped resid.2 dictionary."""

from __future__ import annotations

import time

from sae_circuits import attach, engine, load_dictionaries, load_model
from sae_circuits.sites import Site


def main(repeats: int = 5) -> None:
    model = load_model()
    site = Site.parse("resid.2")
    dictionary = load_dictionaries("main", [site])[site]
    attach(model, {site: dictionary})
    tokens = engine.tokenize(
        model, ["When Mary and John went to the store, John gave a drink to"] * 32
    )
    timings = {}
    for remote in (False, "local"):
        engine.read(model, tokens, [site], remote=remote)  # warm up
        start = time.perf_counter()
        for _ in range(repeats):
            engine.read(model, tokens, [site], remote=remote)
        timings[remote] = (time.perf_counter() - start) / repeats
    size = sum(p.numel() * p.element_size() for p in dictionary.parameters())
    print(f"batch {len(tokens)} x {tokens.length} tokens, {dictionary.kind} dictionary at {site}")
    print(f"dictionary weights carried per request: {size / 1e6:.2f} MB")
    print(f"local splice:            {timings[False] * 1e3:8.1f} ms per read")
    print(f"remote='local' request:  {timings['local'] * 1e3:8.1f} ms per read")
    print(f"ratio: {timings['local'] / timings[False]:.1f}x")


if __name__ == "__main__":
    main()

"""scripts/mutations.toml pins exact code strings; a rename must not break scripts/mutate.py silently."""

import os
import tomllib

from helpers import ROOT


def test_every_mutation_still_matches_its_code_exactly_once():
    with open(os.path.join(ROOT, "scripts", "mutations.toml"), "rb") as f:
        mutations = tomllib.load(f)["mutation"]
    stale = []
    for m in mutations:
        with open(os.path.join(ROOT, m["file"])) as f:
            if f.read().count(m["old"]) != 1:
                stale.append(m["name"])
    assert not stale, f"mutations whose text no longer occurs exactly once: {stale}"

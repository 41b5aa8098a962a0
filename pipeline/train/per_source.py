"""Per-source validation, the same on both backends: each evaluated token's loss is counted under the
source of its label's document (the mix stage's valid.sources stream, read block for block beside
valid.bin), so one pass over the validation split gives the mixed loss and every source's, from the
same per-token losses: the mixed loss is exactly the token-weighted mean of the sources'.

The sums are a float64 [1 + n_sources, 2] table: [loss sum, tokens] over every token (row 0) and over
each source's (row 1 + s)."""
from __future__ import annotations

from typing import Dict, List


def eval_metrics(stats, names: List[str], prefix: str = "eval") -> Dict[str, float]:
    """The summed table -> {eval_loss, eval_tokens, eval_loss/<source>, eval_tokens/<source>}; a source with
    no evaluated token has no loss."""
    out = {f"{prefix}_loss": float(stats[0][0] / stats[0][1]), f"{prefix}_tokens": int(stats[0][1])}
    for s, name in enumerate(names):
        if stats[s + 1][1]:
            out[f"{prefix}_loss/{name}"] = float(stats[s + 1][0] / stats[s + 1][1])
        out[f"{prefix}_tokens/{name}"] = int(stats[s + 1][1])
    return out


def sources_summary(metrics: Dict[str, float], prefix: str = "eval") -> Dict[str, Dict[str, float]]:
    """eval_loss/<source> and eval_tokens/<source> as {source: {loss, tokens}} (train_summary.json)."""
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(f"{prefix}_tokens/")]
    return {n: {"loss": metrics.get(f"{prefix}_loss/{n}"), "tokens": metrics[f"{prefix}_tokens/{n}"]} for n in names}

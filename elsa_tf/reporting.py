"""`summary`: what each level of an embedded model keeps."""

from __future__ import annotations

from elsa_tf import model_ops


class LevelSummary(list):
    """A list of per-level dicts that prints as a table.

    Rows that carry an `"accuracy"` (added by the caller after evaluating each
    level) print it as a last column. A model with gates (`gated`) prints
    each level's `undecided_gates` too.
    """

    gated = False

    def __str__(self) -> str:
        with_accuracy = any("accuracy" in row for row in self)
        with_channels = any("kept_channels" in row for row in self)
        lines = [
            f"{'level':>5}  {'target':>7}  {'achieved':>8}  {'kept':>10}  "
            f"{'of':>10}  {'zeros':>6}  {'react.':>7}  {'status':<8}"
            + ("  channels  weights" if with_channels else "")
            + ("  undecided" if self.gated else "")
            + ("  accuracy" if with_accuracy else "")
        ]
        for row in self:
            accuracy = row.get("accuracy")
            # At channel granularity the target is a share of channels, so
            # the achieved column is too; the weights' sparsity follows it.
            channels = (
                f"  {row['kept_channels']:>4}/{row['total_channels']:<4}"
                f"{row['achieved_sparsity']:>8.2%}"
                if with_channels
                else ""
            )
            achieved = row.get("achieved_channel_sparsity", row["achieved_sparsity"])
            lines.append(
                f"{row['level']:>5}  {row['target_sparsity']:>7.2%}  "
                f"{achieved:>8.2%}  {row['kept']:>10,}  "
                f"{row['total']:>10,}  {row.get('zero_share', 0.0):>6.1%}  "
                f"{row.get('reactivations', 0):>7,}  {row['status']:<8}"
                + channels
                + (f"  {row['undecided_gates']:>9,}" if self.gated else "")
                + (f"  {accuracy:>8.2%}" if accuracy is not None else "")
            )
            for layer in row.get("layers", []):
                lines.append(
                    f"{'':>5}  {layer['weight']:<40} {layer['sparsity']:>8.2%}  "
                    f"{layer['kept']:>10,}  {layer['size']:>10,}"
                )
        return "\n".join(lines)


def summary(model, per_layer: bool = False) -> LevelSummary:
    """One dict per level: target and achieved sparsity, kept parameters.

    Sparsity is measured over the prunable weights. A level not finished yet
    reports what it holds now. `zero_share` is the share of the level's kept
    weights that are exactly zero (capacity it holds but does not use), and
    `reactivations` counts the weights a sparsifier with feedback pruned and
    later brought back during that level's training. `undecided_gates`
    counts, for a gated sparsifier (`PolarizedGates`), the gates that were
    still strictly between 0.05 and 0.95 when the level was hardened (0 for
    other sparsifiers and for levels not finished).

    Args:
        model: an embedded model.
        per_layer: add a `"layers"` list with each prunable weight's detail.

    Returns:
        A `LevelSummary` (a list of dicts with keys `level`,
        `target_sparsity`, `achieved_sparsity`, `kept`, `total`,
        `zero_share`, `reactivations`, `undecided_gates`, `status` and,
        with `per_layer`, `layers`; at channel granularity also `kept_channels`,
        `total_channels` and `achieved_channel_sparsity`, over the unpinned
        channel groups, which is what the target measures); `print()` it for
        a table.

    Raises:
        ValueError: if the model is not embedded.
    """
    sparsities = model_ops.sparsities(model)
    current = model_ops.current_level(model)
    weights = model_ops.level_counts(model)
    reactivations = model_ops.owner(model).reactivations.numpy()
    total = sum(w["size"] for w in weights)
    o = model_ops.owner(model)
    channel_counts = None
    if o.channel_layout is not None:
        channel_counts = [
            sum(int(k.sum()) for k in model_ops.channel_keep(o, level).values())
            for level in range(len(sparsities))
        ]
        total_channels = sum(g.size for g in o.channel_layout)
    undecided = [0] * len(sparsities)
    rows = LevelSummary()
    if o.sparsifier.gated:
        rows.gated = True
        undecided = [max(int(n), 0) for n in o.undecided_gates.numpy()]
    for k, target in enumerate(sparsities):
        kept = sum(w["kept"][k] for w in weights)
        zeros = sum(w["zeros"][k] for w in weights)
        row = {
            "level": k,
            "target_sparsity": target,
            "achieved_sparsity": 1.0 - kept / total,
            "kept": kept,
            "total": total,
            "zero_share": zeros / kept if kept else 0.0,
            "reactivations": int(reactivations[k]),
            "undecided_gates": undecided[k],
            "status": "finished"
            if k < current
            else ("training" if k == current else "pending"),
        }
        if channel_counts is not None:
            row["kept_channels"] = channel_counts[k]
            row["total_channels"] = total_channels
            row["achieved_channel_sparsity"] = 1.0 - channel_counts[k] / total_channels
        if per_layer:
            row["layers"] = [
                {
                    "layer": w["layer"],
                    "weight": w["weight"],
                    "size": w["size"],
                    "kept": w["kept"][k],
                    "sparsity": 1.0 - w["kept"][k] / w["size"],
                }
                for w in weights
            ]
        rows.append(row)
    return rows

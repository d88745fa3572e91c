"""Per-block plot like the paper's Figure 1: the gap between the float and the
quantized block outputs' channel means and variances, before and after tweaking."""

from __future__ import annotations

from pathlib import Path


def write_report(report, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = report.blocks
    idx = [x["index"] for x in b]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "delta_mu", "mean over channels of |mu_f - mu_q|"),
                           (axes[1], "delta_var", "mean over channels of |var_f - var_q|")):
        ax.plot(idx, [x[f"{key}_before_tweak"] for x in b], "o-", label="quantized")
        if report.tweak:
            ax.plot(idx, [x[key] for x in b], "s-", label="quantized + norm tweaking")
        ax.set_xlabel("block")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.legend()
    cfg = report.config
    fig.suptitle(f"{cfg['method'].upper()} W{cfg['bits']} g{cfg['group_size']}: block output statistics vs float")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path

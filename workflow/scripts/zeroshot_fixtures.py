"""Local zero-shot tasks built from held-out corpus text (rule zeroshot_fixtures)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0])  # noqa: F821

from denoiserotator.files.assets import build_zeroshot_fixtures  # noqa: E402

folder = build_zeroshot_fixtures(
    Path(snakemake.input.corpus),  # noqa: F821
    Path(snakemake.output[0]),  # noqa: F821
    items_per_task=snakemake.params.n_items,  # noqa: F821
    seed=snakemake.params.seed,  # noqa: F821
)
print(f"fixtures ready at {folder}")

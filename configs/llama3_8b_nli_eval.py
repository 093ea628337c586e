r"""The KnOTS paper's Llama-3-8B NLI setting, evaluated: six SEQ_CLS LoRAs, merged and scored.

  knots-jax evaluate --config configs/llama3_8b_nli_eval.py:root=/data/knots
  knots-jax evaluate --config configs/llama3_8b_nli_eval.py:root=/data/knots,quick
  knots-jax evaluate --config configs/llama3_8b_nli_eval.py:root=/data/knots,methods=knots_ties

or from Python: `knots_jax.experiments.nli.run_paper_nli(get_config("root=/data/knots"))`.

KnOTS (Stoica et al. 2025, arXiv:2410.19735), Llama-3-8B: one rank-16 LoRA
(q, k, v, o_proj) with a 3-way classification head (PEFT SEQ_CLS,
modules_to_save `score`) per task on SNLI, MNLI, SICK, QNLI, RTE and SciTail;
each task classified by its own head (two-class tasks read only their rows);
TA, TIES, DARE-TIES, KnOTS-TIES, KnOTS-DARE-TIES with the linear search of
alpha, then top-K or DARE's p, on the val split (mean normalized accuracy).

Everything is read from disk under `root` (docs/paper_settings.md):

  <root>/models/Meta-Llama-3-8B/              HF Llama (safetensors) + its tokenizer
  <root>/adapters/Meta-Llama-3-8B/<task>/     PEFT SEQ_CLS LoRA adapters
  <root>/datasets/<task>/<split>.jsonl        {premise, hypothesis, label} lines
                                              (or format=hf: datasets.save_to_disk)

Argument after the colon, comma-separated: `root=DIR`, the preset `quick`
(50 val / 100 test pairs per task, short grids), or `key=value` for any field
(dotted keys reach nested ones: `datasets.rte.format=hf`,
`datasets.mnli.val_split=validation[:2000]`, `max_examples.test=0`). Paths
still at the placeholder are refused with the list of fields to set.
"""

from knots_jax.experiments import nli


def get_config(arg: str | None = None):
  return nli.apply_arg(nli.nli_config(), arg, "configs/llama3_8b_nli_eval.py")

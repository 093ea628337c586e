"""The paper's Llama-3-8B NLI setting (knots_jax.experiments.nli) on a tiny random Llama.

The fine-tuned baselines are checked against transformers + PEFT in PyTorch
on the same tokenized pairs: same logits, same accuracies.
"""

import importlib.util
import json
import os

import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers

from knots_jax.experiments import nli
from tests import peft_factory

WORDS = tuple(("a man dog cat woman runs sleeps eats is not the park in at home food red blue "
         "sits walks child plays ball outside inside happy sad").split())
SPECIALS = ("<unk>", "<s>", "</s>", "<sep>")


def _load_config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("nli_eval_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "llama3_8b_nli_eval.py")


def _tokenizer(model_dir: str) -> None:
  """A word-level fast tokenizer (no pad token: the evaluation pads with eos)."""
  vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <sep> $B:1",
      special_tokens=[("<s>", 1), ("<sep>", 3)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(model_dir)


def _adapter(base: str, out: str, seed: int) -> str:
  torch.manual_seed(seed)
  hf = transformers.LlamaForSequenceClassification.from_pretrained(
      base, num_labels=3, pad_token_id=2, dtype=torch.float32)
  model = peft.get_peft_model(hf, peft.LoraConfig(
      task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(peft_factory.LLAMA_TARGETS),
      init_lora_weights=False))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.normal_(0.0, 0.2)
      elif "modules_to_save" in name:
        param.normal_(0.0, 1.0)
  model.save_pretrained(out)
  return out


def _sentences(rng, n: int) -> list[str]:
  return [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(n)]


def _write_task(folder: str, seed: int, names: list[str]) -> None:
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  for split, n in (("validation", 9), ("test", 13)):
    premises, hypotheses = _sentences(rng, n), _sentences(rng, n)
    labels = rng.integers(0, len(names), size=n).tolist()
    labels[0] = names[labels[0]]          # a label given by name
    labels[1] = -1                        # dropped, as SNLI's unlabeled pairs
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
      for p, h, y in zip(premises, hypotheses, labels):
        f.write(json.dumps({"premise": p, "hypothesis": h, "label": y}) + "\n")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("nli"))
  model_dir = os.path.join(root, "models", "tiny")
  peft_factory.make_base_model(model_dir, seed=0, vocab_size=len(SPECIALS) + len(WORDS))
  _tokenizer(model_dir)
  adapters = os.path.join(root, "adapters", "tiny")
  for i, task in enumerate(("snli", "rte")):
    _adapter(model_dir, os.path.join(adapters, task), seed=10 + i)
    _write_task(os.path.join(root, "datasets", task), 20 + i,
                nli.TASK_LABELS[task][0].split(","))
  arg = (f"root={root},tasks=snli,rte,model_dir={model_dir},adapters_root={adapters},"
         f"methods=ta,knots_ties,dtype=float32,eval_batch_size=4,progress=false,"
         f"workdir={os.path.join(root, 'out')},search.scalings=0.5,1.0,search.top_ks=50,100")
  return root, model_dir, _load_config(CONFIG_FILE, arg)


def test_config_builds_with_the_papers_tasks_and_refuses_placeholders():
  config = _load_config(CONFIG_FILE, "quick")
  assert config.setting == "nli"
  assert config.tasks.split(",") == list(nli.NLI_TASKS)
  assert config.max_examples.test == 100 and config.search.scalings == "0.5,1.0"
  assert config.datasets.rte.head_rows == "0,2"
  with pytest.raises(ValueError, match=r"paths not set: model_dir, adapters_root.*root="):
    nli.check_config(config)
  config = _load_config(CONFIG_FILE, "root=/nowhere,tasks=rte,datasets.rte.val_split=train[:5]")
  assert config.model_dir == "/nowhere/models/Meta-Llama-3-8B"
  assert config.datasets.rte.val_split == "train[:5]"
  with pytest.raises(ValueError, match=r"(?s)missing on disk.*/nowhere/models/Meta-Llama-3-8B"):
    nli.check_config(config)
  with pytest.raises(ValueError, match="unknown field `nope`"):
    _load_config(CONFIG_FILE, "nope=1")


def test_bad_data_names_the_file(setting, tmp_path):
  _, _, config = setting
  d = config.datasets.rte
  with pytest.raises(ValueError, match="no JSON-lines file .*dev.jsonl"):
    nli.load_pairs("rte", d, "dev")
  bad = tmp_path / "rte"
  bad.mkdir()
  (bad / "test.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')
  d2 = d.copy_and_resolve_references()
  d2.path = str(bad)
  with pytest.raises(ValueError, match="label `maybe` is not one of label_names"):
    nli.load_pairs("rte", d2, "test")


def _peft_logits(base: str, adapter: str, ids: list[list[int]]) -> np.ndarray:
  hf = transformers.LlamaForSequenceClassification.from_pretrained(
      base, num_labels=3, pad_token_id=2, dtype=torch.float32, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(hf, adapter).eval()
  t = max(len(r) for r in ids)
  x = torch.full((len(ids), t), 2, dtype=torch.long)
  mask = torch.zeros((len(ids), t), dtype=torch.long)
  for i, r in enumerate(ids):
    x[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
  with torch.no_grad():
    return model(input_ids=x, attention_mask=mask).logits.numpy()


def test_end_to_end_fine_tuned_accuracies_match_peft(setting):
  root, model_dir, config = setting
  results = nli.run_paper_nli(config)
  ft = results["rows"]["fine_tuned"]["tasks"]
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  for task in ("snli", "rte"):
    pairs = nli.load_pairs(task, config.datasets[task], "test")
    assert len(pairs) == 12               # the -1 label dropped, the named one kept
    ids = tok(list(pairs.premises), list(pairs.hypotheses))["input_ids"]
    logits = _peft_logits(model_dir, os.path.join(config.adapters_root, task), ids)
    rows = [int(r) for r in config.datasets[task].head_rows.split(",")]
    expected = float(np.mean(np.argmax(logits[:, rows], axis=1) == pairs.labels))
    assert ft[task]["accuracy"] == pytest.approx(expected, abs=1e-12), task
  assert results["union_names"] == ["entailment", "neutral", "contradiction", "not_entailment"]
  for method in ("ta", "knots_ties"):
    row = results["rows"][method]
    assert set(row["tasks"]) == {"snli", "rte"}
    assert set(row["joint"]) == {"snli", "rte", "Union"}
    assert row["test_score"] == pytest.approx(row["average"]["normalized"])
  ens = results["rows"]["ensemble"]
  assert 0.0 <= ens["average"]["accuracy"] <= 1.0 and "hits@1" in ens["joint"]["Union"]
  with open(os.path.join(config.workdir, "results.json")) as f:
    assert json.load(f)["tasks"] == ["snli", "rte"]
  assert "## knots_ties" in open(os.path.join(config.workdir, "results.md")).read()


def test_evaluator_logits_match_peft_per_head_row(setting):
  _, model_dir, config = setting
  tasks = ["snli", "rte"]
  import knots_jax
  from knots_jax.models import lora
  adapters = knots_jax.load_adapters([nli.adapter_dir(config, t) for t in tasks], names=tasks)
  ev = nli.NliEvaluator(config, tasks, adapters)
  model = ev.model()
  lora.attach_adapter(model, adapters.adapters[1])
  got = ev.logits(model, "val")["snli"][:, ev.heads.blocks["rte"]]
  want = _peft_logits(model_dir, nli.adapter_dir(config, "rte"), ev.ids["val"]["snli"])[:, [0, 2]]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

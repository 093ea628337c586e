"""regmean: Grams from NNX models, the closed-form merge, and the writers.

References are float64 NumPy: the least-squares problem RegMean solves
(`numpy.linalg.lstsq` on the stacked inputs), the normal equations with W0
kept in, and forward passes written out by hand.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import knots_jax
from knots_jax.adapters.peft_files import Adapter, AdapterSet, LoraFactors
from knots_jax.export import full_model
from knots_jax.io import hf_checkpoint
from knots_jax.merging import regmean
from knots_jax.models import lora
from knots_jax.parallel import sharding
from tests import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIMS = (6, 5, 4)   # mlp.0: 6 -> 5, mlp.1: 5 -> 4 (+ head mlp.2: 4 -> 3)


class Mlp(nnx.Module):
  """A small classifier of LoraLinear layers: tanh(x W0^T + b0) W1^T ... -> logits."""

  def __init__(self, dims=DIMS + (3,)):
    self.layers = nnx.List([lora.LoraLinear(i, o, hf_name=f"mlp.{k}", use_bias=True)
                            for k, (i, o) in enumerate(zip(dims[:-1], dims[1:]))])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def mlp_weights(seed=0, dims=DIMS + (3,)):
  rng = np.random.default_rng(seed)
  w = {}
  for k, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
    w[f"mlp.{k}.weight"] = (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
    w[f"mlp.{k}.bias"] = (0.1 * rng.normal(size=o)).astype(np.float32)
  return w


def make_mlp(seed=0):
  model, w = Mlp(), mlp_weights(seed)
  targets = {}
  for layer in lora.linears(model).values():
    targets.update(lora.linear_targets(layer))
  lora.load_hf_tensors(targets, w)
  return model, w


def mlp_adapters(seed=1, ranks=(2, 2)):
  shapes = {f"mlp.{k}": (o, i) for k, (i, o) in enumerate(zip(DIMS[:-1], DIMS[1:]))}
  return synthetic.adapter_set(ranks=ranks, seed=seed, shapes=shapes)


def numpy_inputs(w, adapter, x):
  """{module: the float64 rows each layer sees} with `adapter` attached."""
  seen, h = {}, x.reshape(-1, x.shape[-1]).astype(np.float64)
  for k in range(3):
    name = f"mlp.{k}"
    seen[name] = h
    weight = w[f"{name}.weight"].astype(np.float64)
    if adapter is not None and name in adapter.modules:
      weight = weight + adapter.modules[name].delta()
    h = h @ weight.T + w[f"{name}.bias"]
    if k < 2:
      h = np.tanh(h)
  return seen


def as_float64(adapters):
  """The same adapters with float64 factors (stacks fold the scale in the factors' dtype)."""
  return AdapterSet(tuple(Adapter(ad.path, ad.name, ad.config, {
      m: LoraFactors(f.a.astype(np.float64), f.b.astype(np.float64), f.scale)
      for m, f in ad.modules.items()}, {}) for ad in adapters.adapters))


def random_problem(seed=0, rows=(40, 25, 60), shapes=None):
  """Adapters (float64 factors), inputs X_i per module and their mean Grams."""
  adapters = as_float64(synthetic.adapter_set(ranks=(2, 3, 4)[:len(rows)], seed=seed,
                                              shapes=shapes))
  rng = np.random.default_rng(seed + 10)
  inputs = [{m: rng.normal(size=(r, f.shape[1])) * rng.uniform(0.2, 3.0, size=f.shape[1])
             for m, f in adapters.adapters[0].modules.items()} for r in rows]
  grams = [{m: x.T @ x / len(x) for m, x in task.items()} for task in inputs]
  return adapters, inputs, grams


def base_weights_for(adapters, seed=0):
  rng = np.random.default_rng(seed + 20)
  return {f"{m}.weight": rng.normal(size=f.shape)
          for m, f in adapters.adapters[0].modules.items()}


def regmean_reference(adapters, base, grams, off_diagonal=1.0, ridge=0.0):
  """W* - W0 from the normal equations with W_i = W0 + delta_i (W0 kept in), float64."""
  out = {}
  for m in adapters.module_names:
    w0 = base[f"{m}.weight"]
    gs = [np.asarray(g[m], np.float64) for g in grams]
    gs = [off_diagonal * g + (1 - off_diagonal) * np.diag(np.diag(g)) for g in gs]
    lhs = sum(gs)
    lhs = lhs + ridge * np.mean(np.diag(lhs)) * np.eye(len(lhs))
    rhs = sum(g @ (w0 + f.delta()).T for g, f in zip(gs, adapters.factors(m)))
    rhs = rhs + ridge * np.mean(np.diag(sum(gs))) * w0.T
    out[m] = np.linalg.solve(lhs, rhs).T - w0
  return out


# ------------------------------------------------------------------- merge


@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-4), ("float64", 1e-10)])
def test_merge_is_the_least_squares_optimum_on_the_inputs(dtype, rtol):
  adapters, inputs, grams = random_problem()
  base = base_weights_for(adapters)
  result = regmean.regmean_merge(adapters, base, grams, dtype=dtype)
  assert not result.is_factored and result.method == "regmean"
  assert result.module_names == adapters.module_names
  for m in adapters.module_names:
    w0 = base[f"{m}.weight"]
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2 / N_i : stacked least squares in the x W^T orientation
    xs = [task[m] / np.sqrt(len(task[m])) for task in inputs]
    targets = [x @ (w0 + f.delta()).T for x, f in zip(xs, adapters.factors(m))]
    w_t, *_ = np.linalg.lstsq(np.concatenate(xs), np.concatenate(targets), rcond=None)
    expected = w_t.T - w0
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.delta(m), expected, rtol=rtol, atol=rtol * scale,
                               err_msg=m)


def test_off_diagonal_and_ridge_follow_the_normal_equations():
  adapters, _, grams = random_problem(seed=3)
  base = base_weights_for(adapters, 3)
  for alpha, ridge in ((0.6, 0.0), (1.0, 0.05), (0.3, 0.2)):
    result = regmean.regmean_merge(adapters, base, grams, off_diagonal=alpha, ridge=ridge,
                                   dtype="float64")
    expected = regmean_reference(adapters, base, grams, alpha, ridge)
    for m in adapters.module_names:
      np.testing.assert_allclose(result.delta(m), expected[m], rtol=1e-9, atol=1e-10,
                                 err_msg=f"alpha={alpha} ridge={ridge} {m}")
    assert result.settings["off_diagonal"] == alpha and result.settings["ridge"] == ridge


def test_off_diagonal_zero_is_a_per_input_feature_weighted_average():
  adapters, _, grams = random_problem(seed=4)
  result = regmean.regmean_merge(adapters, None, grams, off_diagonal=0.0, dtype="float64")
  for m in adapters.module_names:
    d = np.stack([np.diag(g[m]) for g in grams])                 # [n, in]
    deltas = np.stack([f.delta() for f in adapters.factors(m)])  # [n, out, in]
    expected = np.einsum("ni,noi->oi", d, deltas) / d.sum(0)
    np.testing.assert_allclose(result.delta(m), expected, rtol=1e-10, atol=1e-12)


def test_identical_tasks_give_back_the_task_update():
  one = synthetic.adapter_set(ranks=(3,), seed=5).adapters[0]
  adapters = AdapterSet(tuple(Adapter(f"mem://{i}", f"t{i}", one.config, one.modules, {})
                              for i in range(3)))
  _, _, grams = random_problem(seed=6)
  result = regmean.regmean_merge(adapters, None, grams, off_diagonal=0.7)
  for m in adapters.module_names:
    np.testing.assert_allclose(result.delta(m), one.modules[m].delta(), rtol=1e-4, atol=1e-5)


def test_features_no_input_reaches_keep_the_plain_average():
  adapters, inputs, _ = random_problem(seed=7)
  grams = []
  for task in inputs:
    g = {}
    for m, x in task.items():
      x = x.copy()
      x[:, 2] = 0.0       # input feature 2 is never active in any task
      g[m] = x.T @ x / len(x)
    grams.append(g)
  result = regmean.regmean_merge(adapters, None, grams, dtype="float64")
  base = {f"{m}.weight": np.zeros(f.shape) for m, f in adapters.adapters[0].modules.items()}
  for m in adapters.module_names:
    deltas = np.stack([f.delta() for f in adapters.factors(m)])
    np.testing.assert_allclose(result.delta(m)[:, 2], deltas[:, :, 2].mean(0), rtol=1e-10)
    live = [j for j in range(deltas.shape[-1]) if j != 2]
    reduced = [{m: g[m][np.ix_(live, live)]} for g in grams]
    sub = AdapterSet(tuple(Adapter(ad.path, ad.name, ad.config, {m: LoraFactors(
        ad.modules[m].a[:, live], ad.modules[m].b, ad.modules[m].scale)}, {})
        for ad in adapters.adapters))
    expected = regmean_reference(sub, {f"{m}.weight": base[f"{m}.weight"][:, live]}, reduced)
    np.testing.assert_allclose(result.delta(m)[:, live], expected[m], rtol=1e-9, atol=1e-10)


def test_singular_system_names_the_module_and_the_regularisation():
  adapters, _, grams = random_problem(seed=8, rows=(2, 3, 2))   # 7 rows < 10 input features
  with pytest.raises(ValueError, match=r"singular.*model\.layers\.0\.self_attn\.k_proj.*"
                                       r"off_diagonal=1\.0, ridge=0\.0"):
    regmean.regmean_merge(adapters, None, grams)
  with pytest.raises(ValueError, match="singular"):
    regmean.regmean_merge(adapters, None, grams, dtype="float64")
  base = base_weights_for(adapters, 8)
  for kw in (dict(ridge=1e-2), dict(off_diagonal=0.9)):
    result = regmean.regmean_merge(adapters, base, grams, dtype="float64", **kw)
    expected = regmean_reference(adapters, base, grams, kw.get("off_diagonal", 1.0),
                                 kw.get("ridge", 0.0))
    for m in adapters.module_names:
      np.testing.assert_allclose(result.delta(m), expected[m], rtol=1e-8, atol=1e-10)


def test_modules_without_grams_are_averaged_with_a_warning():
  adapters, _, grams = random_problem(seed=9)
  dropped = "model.layers.1.self_attn.q_proj"
  partial = [{m: g for m, g in task.items() if m != dropped} for task in grams]
  with pytest.warns(UserWarning, match=f"average of the task updates.*{dropped}"):
    result = regmean.regmean_merge(adapters, None, partial, dtype="float64")
  mean = np.mean([f.delta() for f in adapters.factors(dropped)], axis=0)
  np.testing.assert_allclose(result.delta(dropped), mean, rtol=1e-10)
  full = regmean.regmean_merge(adapters, None, grams, dtype="float64")
  other = "model.layers.0.self_attn.q_proj"
  np.testing.assert_allclose(result.delta(other), full.delta(other), rtol=1e-12)
  assert result.stats["averaged_modules"] == [dropped]


def test_bad_grams_raise_naming_the_module_and_task():
  adapters, _, grams = random_problem(seed=10)
  module = "model.layers.1.self_attn.k_proj"
  with pytest.raises(ValueError, match="2 dicts for 3 adapters"):
    regmean.regmean_merge(adapters, None, grams[:2])
  some = [dict(g) for g in grams]
  del some[1][module]
  with pytest.raises(ValueError, match=f"`{module}`.*not for task1"):
    regmean.regmean_merge(adapters, None, some)
  wrong = [dict(g) for g in grams]
  wrong[2][module] = np.eye(6)
  with pytest.raises(ValueError, match=rf"`{module}` of task `task2` has shape \(6, 6\), "
                                       r"expected \(10, 10\)"):
    regmean.regmean_merge(adapters, None, wrong)
  nan = [dict(g) for g in grams]
  nan[0][module] = np.full((10, 10), np.nan)
  with pytest.raises(ValueError, match=f"`{module}` contain NaN"):
    regmean.regmean_merge(adapters, None, nan)
  base = base_weights_for(adapters)
  base[f"{module}.weight"] = np.zeros((6, 9))
  with pytest.raises(ValueError, match=module):
    regmean.regmean_merge(adapters, base, grams)
  with pytest.raises(ValueError, match="off_diagonal must be in"):
    regmean.regmean_merge(adapters, None, grams, off_diagonal=1.5)


def test_modules_to_save_are_refused_then_merged_as_asked():
  adapters, _, grams = random_problem(seed=11)
  heads = [np.full((3, 4), float(i)) for i in range(3)]
  with_head = AdapterSet(tuple(Adapter(ad.path, ad.name, ad.config, ad.modules, {"score.weight": h})
                               for ad, h in zip(adapters.adapters, heads)))
  with pytest.raises(ValueError, match="modules_to_save"):
    regmean.regmean_merge(with_head, None, grams)
  result = regmean.regmean_merge(with_head, None, grams, modules_to_save="mean")
  np.testing.assert_array_equal(result.extra["score.weight"], np.full((3, 4), 1.0))
  assert result.settings["modules_to_save"] == "mean"


# ------------------------------------------------------------ Gram matrices


def test_collect_grams_equal_numpy_inputs_of_each_layer_with_the_adapter():
  model, w = make_mlp()
  adapters = mlp_adapters()
  rng = np.random.default_rng(11)
  batches = [[rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2)],
             [rng.normal(size=(2, 3, 6)).astype(np.float32)]]     # extra axis: rows are 2 x 3
  forward = lambda m, x: m(x)
  grams = regmean.task_grams(model, forward, adapters, batches)
  assert all(layer.lora_a is None and layer.input_gram is None
             for layer in lora.linears(model).values())
  assert [sorted(g) for g in grams] == [["mlp.0", "mlp.1"]] * 2
  for task, (adapter, task_batches) in enumerate(zip(adapters.adapters, batches)):
    seen = [numpy_inputs(w, adapter, x) for x in task_batches]
    for m in ("mlp.0", "mlp.1"):
      rows = np.concatenate([s[m] for s in seen])
      np.testing.assert_allclose(grams[task][m], rows.T @ rows / len(rows), rtol=2e-5,
                                 atol=1e-6, err_msg=f"task {task} {m}")
  # the second layer's inputs depend on the attached adapter, the first layer's do not
  same = regmean.task_grams(model, forward, adapters, [batches[1], batches[1]])
  np.testing.assert_allclose(same[0]["mlp.0"], same[1]["mlp.0"], rtol=1e-6)
  assert np.abs(same[0]["mlp.1"] - same[1]["mlp.1"]).max() > 1e-3
  everything = regmean.collect_grams(model, forward, batches[1])
  assert sorted(everything) == ["mlp.0", "mlp.1", "mlp.2"]


def test_collect_grams_refuses_unknown_and_unused_modules():
  model, _ = make_mlp()
  x = np.ones((2, 6), np.float32)
  with pytest.raises(ValueError, match="mlp.9"):
    regmean.collect_grams(model, lambda m, x: m(x), [x], ["mlp.9"])
  with pytest.raises(ValueError, match="`mlp.0`.*saw no inputs"):
    regmean.collect_grams(model, lambda m, x: m(x), [], ["mlp.0"])
  assert all(layer.input_gram is None for layer in lora.linears(model).values())
  with pytest.raises(ValueError, match="1 batch sets for 2 adapters"):
    regmean.task_grams(model, lambda m, x: m(x), mlp_adapters(), [[x]])


def test_grams_from_the_model_give_the_optimum_of_the_layers_outputs():
  """End to end on the MLP: the merged mlp.1 minimises the output error on each task's inputs."""
  model, w = make_mlp()
  adapters = mlp_adapters(seed=12)
  rng = np.random.default_rng(12)
  batches = [[rng.normal(size=(30, 6)).astype(np.float32)] for _ in range(2)]
  grams = regmean.task_grams(model, lambda m, x: m(x), adapters, batches)
  result = regmean.regmean_merge(adapters, w, grams, dtype="float64")
  m = "mlp.1"
  xs = [numpy_inputs(w, ad, b[0])[m] for ad, b in zip(adapters.adapters, batches)]
  xs = [x / np.sqrt(len(x)) for x in xs]
  w0 = w[f"{m}.weight"].astype(np.float64)
  targets = [x @ (w0 + f.delta()).T for x, f in zip(xs, adapters.factors(m))]
  w_t, *_ = np.linalg.lstsq(np.concatenate(xs), np.concatenate(targets), rcond=None)
  np.testing.assert_allclose(result.delta(m), w_t.T - w0, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- writers and models


def test_real_peft_adapters_through_save_merged_weights(llama_family, tmp_path):
  base_dir, adapter_dirs = llama_family
  adapters = knots_jax.load_adapters(adapter_dirs)
  keys = [f"{m}.weight" for m in adapters.module_names]
  base = hf_checkpoint.read_tensors(base_dir, keys)
  rng = np.random.default_rng(13)
  grams = []
  for _ in adapters.adapters:
    task = {}
    for m in adapters.module_names:
      x = rng.normal(size=(80, base[f"{m}.weight"].shape[1]))
      task[m] = x.T @ x / len(x)
    grams.append(task)
  result = regmean.regmean_merge(adapters, base, grams, off_diagonal=0.8)
  expected = regmean_reference(adapters, {k: v.astype(np.float64) for k, v in base.items()},
                               grams, 0.8)
  report = knots_jax.save_merged_weights(result, base_dir, str(tmp_path / "merged"))
  assert report["tensors"] == len(keys)
  written = safetensors.numpy.load_file(str(tmp_path / "merged" / "model.safetensors"))
  streamed = dict(full_model.merged_model_weights(result, base_dir, keys=keys))
  for m in adapters.module_names:
    key = f"{m}.weight"
    want = base[key].astype(np.float64) + expected[m]
    np.testing.assert_allclose(written[key], want, rtol=1e-4, atol=1e-5, err_msg=m)
    np.testing.assert_allclose(np.asarray(streamed[key]), want, rtol=1e-4, atol=1e-5)
  with open(tmp_path / "merged" / "knots_config.json") as f:
    assert json.load(f)["method"] == "regmean"


def test_flax_llama_grams_and_merge(llama_family):
  """Grams from the Flax Llama: q/k/v share their input, layer 0's input ignores the adapter,
  and the merged weights satisfy RegMean's normal equations."""
  llama = pytest.importorskip("knots_jax.models.llama")
  base_dir, adapter_dirs = llama_family
  adapters = knots_jax.load_adapters(adapter_dirs)
  model = llama.from_pretrained(base_dir)
  rng = np.random.default_rng(14)
  ids = rng.integers(0, 96, size=(2, 24))
  batches = [[ids] for _ in adapters.adapters]     # the same tokens for every task
  grams = regmean.task_grams(model, lambda m, ids: m(ids), adapters, batches)
  q, k, v = (f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
  np.testing.assert_array_equal(grams[0][q], grams[0][k])
  np.testing.assert_array_equal(grams[0][q], grams[0][v])
  first = "model.layers.0.self_attn.q_proj"
  np.testing.assert_allclose(grams[0][first], grams[1][first], rtol=1e-6)
  assert not np.allclose(grams[0][q], grams[1][q], rtol=1e-3)
  result = regmean.regmean_merge(adapters, None, grams, off_diagonal=0.9)
  for m in (first, q, "model.layers.1.self_attn.o_proj"):
    gs = [0.9 * g[m].astype(np.float64) + 0.1 * np.diag(np.diag(g[m])) for g in grams]
    residual = sum(g @ (result.delta(m) - f.delta()).T for g, f in zip(gs, adapters.factors(m)))
    scale = sum(np.abs(g @ f.delta().T).max() for g, f in zip(gs, adapters.factors(m)))
    assert np.abs(residual).max() < 1e-4 * scale, m


SHARDED_SCRIPT = """
import os, sys, json
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {root!r})
import jax, numpy as np
from knots_jax.merging import regmean
from knots_jax.parallel import sharding
from tests.merging.test_regmean import make_mlp, mlp_adapters
from knots_jax.models import lora
model, _ = make_mlp()
lora.attach_adapter(model, mlp_adapters().adapters[1])
mesh = sharding.make_mesh()
x = np.load({inputs!r})
grams = regmean.collect_grams(model, lambda m, x: m(x), [x[:16], x[16:]], mesh=mesh)
np.savez({out!r}, **grams)
print(json.dumps({{"devices": jax.device_count()}}))
"""


def test_grams_on_eight_host_devices_equal_numpy(tmp_path):
  _, w = make_mlp()
  adapter = mlp_adapters().adapters[1]
  x = np.random.default_rng(15).normal(size=(24, 6)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  script = SHARDED_SCRIPT.format(root=ROOT, inputs=str(tmp_path / "x.npy"),
                                 out=str(tmp_path / "grams.npz"))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  assert json.loads(done.stdout.strip().splitlines()[-1])["devices"] == 8
  got = np.load(tmp_path / "grams.npz")
  seen = numpy_inputs(w, adapter, x)
  for m in ("mlp.0", "mlp.1", "mlp.2"):
    np.testing.assert_allclose(got[m], seen[m].T @ seen[m] / len(x), rtol=2e-5, atol=1e-6)


def test_place_batch_refuses_batches_that_do_not_split():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  placed = regmean.place_batch({"x": np.ones((3, 2))}, mesh)
  assert placed["x"].sharding.mesh == mesh
  with pytest.raises(ValueError, match="leading \\(batch\\) axis"):
    regmean.place_batch(np.float32(1.0), mesh)


def test_place_batch_splits_the_batch_axis_over_every_mesh_axis():
  """The layout rule lives in `sharding.batch_spec`: axis 0 over all mesh axes, rest replicated."""
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  x = np.arange(24.0).reshape(4, 3, 2)
  placed = regmean.place_batch({"x": x, "ids": np.arange(4)}, mesh)
  assert placed["x"].sharding.spec == PartitionSpec(("data", "model"), None, None)
  assert placed["ids"].sharding.spec == PartitionSpec(("data", "model"))
  assert placed["x"].sharding == sharding.batch_sharding(mesh, 3)
  np.testing.assert_array_equal(np.asarray(placed["x"]), x)
  assert regmean.place_batch(placed, mesh)["x"] is placed["x"]   # already on the mesh: kept
  assert not sharding.is_on_mesh(x, mesh)
  with pytest.raises(ValueError, match="at least one axis"):
    sharding.batch_spec(mesh, 0)

"""The training loop's mechanics, checked against hand-derived math: analytic gradients, the SGD update,
least squares, mini-batches, momentum and divergence."""

from __future__ import annotations

import ctypes
import logging
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config, data, loop, tuning
from pipeline.errors import BuildError
from tests.training import run, train_arrays


def params_before_each_epoch(t: loop.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    w = np.vstack([t.init_weight, t.weights()[:-1]]).astype(np.float64)
    b = np.concatenate(([t.init_bias], t.column("bias")[:-1])).astype(np.float64)
    return w, b


def test_recorded_loss_and_gradients_equal_the_analytic_ones(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    t = run(cfg)
    w, b = params_before_each_epoch(t)
    residual = w @ X.T + b[:, None] - y[None, :]  # (epochs, N) in float64
    # L = mean(r^2);  dL/dw = 2/N sum(r x);  dL/db = 2/N sum(r)
    np.testing.assert_allclose(t.column("loss"), (residual**2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(t.column("grad_weight"), 2 * (residual * X[:, 0]).mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(t.column("grad_bias"), 2 * residual.mean(axis=1), rtol=1e-4, atol=1e-6)


def test_gradient_descent_reaches_least_squares(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    A = np.column_stack([X, np.ones(len(X))])
    (w_ls, b_ls), *_ = np.linalg.lstsq(A, y, rcond=None)
    t = run(cfg, dtype=torch.float64, epochs=400)
    assert abs(t.column("weight")[-1] - w_ls) < 1e-10 and abs(t.column("bias")[-1] - b_ls) < 1e-10
    t32 = run(cfg)  # the defaults: float32, 100 epochs
    assert abs(t32.column("weight")[-1] - w_ls) < 1e-4


def test_several_features_reach_least_squares(cfg: config.Config) -> None:
    X, y = train_arrays(cfg, true_weights=[1.0, -2.0, 0.5], n_samples=400)
    coef, *_ = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)
    for method in loop.METHODS:
        t = run(cfg, method, torch.float64, X, y, epochs=400)
        assert t.weights().shape == (400, 3)
        np.testing.assert_allclose(np.append(t.weights()[-1], t.column("bias")[-1]), coef, atol=1e-9)
    assert list(t.frame().columns) == data.trajectory_columns(3)
    assert data.trajectory_columns(3)[2:6] == ["grad_weight_1", "grad_weight_2", "grad_weight_3", "grad_bias"]


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_each_optimizer_lowers_the_loss(cfg: config.Config, name: str) -> None:
    loss = run(cfg, optimizer=name, lr=0.05, epochs=50).column("loss")
    assert loss[-1] < 0.1 * loss[0]


def test_the_fused_adam_the_pipeline_uses_is_torchs_adam(cfg: config.Config) -> None:
    # The oracle: torch's default (for-loop) Adam, one tensor at a time; fused is one kernel for the same update.
    X, y = loop.as_arrays(*train_arrays(cfg), torch.float64)
    model = loop.make_model(cfg.train.init_seed, 1, torch.float64)
    reference = loop.NNLearner(model, X, y, "sgd", 0.05, 0.0)
    reference.optimizer = torch.optim.Adam(reference.model.parameters(), lr=0.05, foreach=False)
    fused = loop.make_learner("nn", loop.make_model(cfg.train.init_seed, 1, torch.float64), X, y, "adam", 0.05, 0.0)
    assert fused.optimizer.defaults["fused"]  # type: ignore[attr-defined]
    a, b = loop.fit(reference, len(X), 100), loop.fit(fused, len(X), 100)
    np.testing.assert_allclose(b.values, a.values, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", loop.METHODS)
def test_momentum_matches_torch_sgd_for_every_method(cfg: config.Config, method: str) -> None:
    reference = run(cfg, "nn", torch.float64, momentum=0.9, epochs=60)
    t = run(cfg, method, torch.float64, momentum=0.9, epochs=60)
    np.testing.assert_allclose(t.values, reference.values, rtol=1e-11, atol=1e-13)


def test_mini_batches_are_seeded_cover_every_row_and_agree_across_methods(cfg: config.Config) -> None:
    rng = np.random.default_rng(0)
    parts = list(loop.batches(10, 4, rng))
    assert [len(p) for p in parts] == [4, 4, 2]  # type: ignore[arg-type]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))  # type: ignore[arg-type]
    a = run(cfg, "nn", torch.float64, batch_size=16, epochs=20)
    b = run(cfg, "numpy", torch.float64, batch_size=16, epochs=20)
    assert len(a.batch_loss) == 20 * 5  # 80 rows in batches of 16: 5 steps per epoch
    np.testing.assert_allclose(a.values, b.values, rtol=1e-11, atol=1e-13)
    c = run(cfg, "nn", torch.float64, batch_size=16, epochs=20, shuffle_seed=1)
    assert not np.array_equal(a.batch_loss, c.batch_loss)  # another shuffle, another path
    # Stochastic: the path differs from full batch, and with 5 steps per epoch it gets near the optimum sooner.
    full = run(cfg, "nn", torch.float64, epochs=20)
    assert not np.allclose(a.column("weight"), full.column("weight"))
    X, y = train_arrays(cfg)
    w_ls = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0][0]
    assert abs(a.column("weight")[-1] - w_ls) < 0.01 < abs(full.column("weight")[-1] - w_ls)


def test_epoch_row_of_mini_batches_is_the_size_weighted_mean_of_its_steps(cfg: config.Config) -> None:
    t = run(cfg, "numpy", torch.float64, batch_size=30, epochs=3)  # 80 rows: batches of 30, 30, 20
    per_epoch = t.batch_loss.reshape(3, 3)
    np.testing.assert_allclose(t.column("loss"), per_epoch @ np.array([30, 30, 20]) / 80, rtol=1e-14)


def test_divergence_stops_at_the_first_non_finite_loss(cfg: config.Config) -> None:
    t = run(cfg, "nn", torch.float32, lr=50.0, epochs=10_000)
    assert t.diverged_at is not None and t.diverged_at < 10_000
    assert len(t.values) == t.diverged_at
    assert np.all(np.isfinite(t.column("loss")[:-1])) and not np.isfinite(t.column("loss")[-1])


def test_initialisation_is_seeded_random_and_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a, b, c = loop.make_model(0), loop.make_model(0), loop.make_model(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_train_step_runs_the_five_steps_in_order() -> None:
    calls: list[str] = []
    model = loop.make_model(0)
    X, Y = (torch.from_numpy(a) for a in loop.as_arrays(np.array([1.0, 2.0]), np.array([3.0, 6.0])))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.register_forward_hook(lambda *_: calls.append("forward"))
    criterion = torch.nn.MSELoss()
    criterion.register_forward_hook(lambda *_: calls.append("loss"))
    model.weight.register_hook(lambda g: calls.append("backward"))
    optimizer.register_step_pre_hook(lambda *_: calls.append("step"))
    zero_grad = optimizer.zero_grad
    optimizer.zero_grad = lambda *a, **k: (calls.append("zero_grad"), zero_grad(*a, **k))[1]  # type: ignore[method-assign]
    loop.train_step(model, criterion, optimizer, X, Y)
    assert calls == ["forward", "loss", "zero_grad", "backward", "step"]


def test_compile_is_chosen_only_where_it_pays() -> None:
    assert not tuning.should_compile("auto", "nn", 100, 1000)  # the defaults: eager
    assert tuning.should_compile("auto", "nn", 10_000_000, 1000)
    assert not tuning.should_compile("auto", "numpy", 10_000_000, 1000)
    assert not tuning.should_compile("auto", "nn", 100_000, 100_000)  # many epochs, but the compiled step is slower
    assert tuning.should_compile("on", "nn", 10, 1) and not tuning.should_compile("off", "nn", 10**8, 10**4)


@pytest.mark.stage
def test_compiled_five_steps_follow_the_eager_trajectory(cfg: config.Config) -> None:
    X, y = train_arrays(cfg, n_samples=20_000)
    Xa, ya = loop.as_arrays(X, y, torch.float64)
    runs = []
    for compile_step in (False, True):
        learner = loop.make_learner("nn", loop.make_model(0, 1, torch.float64), Xa, ya, "sgd", 0.1, 0.0, compile_step)
        runs.append(loop.fit(learner, len(Xa), 30))
    # The compiled step fuses the sums differently; in float64 that changes only the last bits.
    np.testing.assert_allclose(runs[1].values, runs[0].values, rtol=1e-10, atol=1e-12)


@pytest.mark.stage  # compiling from a cold inductor cache
def test_compiled_step_in_float32_follows_eager_repeats_exactly_and_leaves_torch_config_alone(
    cfg: config.Config,
) -> None:
    import torch._functorch.config as functorch_config
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    before = (functorch_config.activation_memory_budget, decompose_mem_bound_mm.cpu_max_first_dimension_decomposition)
    X, y = loop.as_arrays(*train_arrays(cfg, n_samples=125_000))  # 1e5 training rows, the pipeline's float32
    runs = []
    for compile_step in (False, True, True):
        learner = loop.make_learner("nn", loop.make_model(0), X, y, "sgd", 0.1, 0.0, compile_step)
        runs.append(loop.fit(learner, len(X), 20).values)
    # The compiled step recomputes the residual in the backward and sums in another order: float32 rounding.
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4, atol=1e-5)
    assert runs[1].tobytes() == runs[2].tobytes()  # deterministic: same params, same bytes
    # The compile settings apply only around the compiled calls; the rest of the process keeps torch's defaults.
    after = (functorch_config.activation_memory_budget, decompose_mem_bound_mm.cpu_max_first_dimension_decomposition)
    assert after == before


def test_library_folders_with_a_space_need_the_workaround_which_changes_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real link against a library in a folder with a space, as torch/lib is in a venv under "new user ü"."""
    from torch._inductor import cpp_builder, exc

    def link(folder: Path, name: str) -> cpp_builder.CppBuilder:
        """A builder for lib<name>.so in tmp_path, linked against libanswer.so in `folder`."""
        (tmp_path / f"{name}.cpp").write_text('int answer();\nextern "C" int twice() { return 2 * answer(); }\n')
        options = cpp_builder.BuildOptionsBase(
            compiler="g++", cflags=["shared", "fPIC"], libraries_dirs=[str(folder)], libraries=["answer"]
        )
        return cpp_builder.CppBuilder(name, [str(tmp_path / f"{name}.cpp")], options, str(tmp_path))

    plain, spaced = tmp_path / "lib", tmp_path / "new user ü" / "lib"
    for folder in (plain, spaced):
        folder.mkdir(parents=True)
        (folder / "answer.cpp").write_text("int answer() { return 21; }\n")
        library = ["-shared", "-fPIC", "-Wl,-soname,libanswer.so", "-o", folder / "libanswer.so"]
        subprocess.run(["g++", folder / "answer.cpp", *library], check=True)
    try:  # torch's own command: the folder cut in two at its space
        link(spaced, "own").build()
    except exc.CppCompileError as e:
        failed = e
    else:
        pytest.fail("torch quotes -L folders itself now (pytorch/pytorch#191010): remove tuning.quoted_library_dirs")
    assert "cannot find" in failed.output, failed.output
    # Inductor's page of compiler output as the stage shows it: one line, naming what the linker missed; the whole
    # page in the debug log (PIPELINE_LOG_LEVEL=DEBUG).
    with (
        caplog.at_level(logging.DEBUG, "pipeline.tuning"),
        pytest.raises(BuildError) as one_line,
        tuning.one_line_build_errors(),
    ):
        raise exc.InductorError(failed, None)
    assert "could not be built: /usr/bin/ld: cannot find" in str(one_line.value) and "\n" not in str(one_line.value)
    assert failed.output in caplog.text
    with tuning.quoted_library_dirs():
        builders = {"plain": link(plain, "plain"), "spaced": link(spaced, "spaced")}
        builders["spaced"].build()
    ctypes.CDLL(str(spaced / "libanswer.so"), mode=ctypes.RTLD_GLOBAL)  # what the linked library needs at load
    assert ctypes.CDLL(builders["spaced"].get_target_file_path()).twice() == 42
    # What the compiler is given: where no folder needs quoting, torch's own command word for word; with a space,
    # the same words but for the folder's name.
    own = link(plain, "plain").get_command_line()
    assert builders["plain"].get_command_line() == own
    renamed = [w.replace(str(plain), str(spaced)).replace("plain", "spaced") for w in shlex.split(own)]
    assert shlex.split(builders["spaced"].get_command_line()) == renamed


def test_module_attributes_are_set_inside_the_block_and_restored_after_it_even_on_error() -> None:
    import types

    module = types.ModuleType("settings")
    module.limit = 1  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError), tuning.module_attributes(module, limit=2**62):
        assert module.limit == 2**62  # type: ignore[attr-defined]
        raise RuntimeError
    assert module.limit == 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError), tuning.module_attributes(module, limt=2):  # a misspelt name is not added
        pass
    assert not hasattr(module, "limt")


def test_one_feature_is_stored_column_major_without_a_copy() -> None:
    X = torch.arange(5.0).reshape(5, 1)
    C = tuning.column_major(X)
    assert torch.equal(C, X) and C.stride() == (1, 5) and C.data_ptr() == X.data_ptr()
    wide = torch.zeros(5, 3)
    assert tuning.column_major(wide) is wide  # several features: left as they are


def test_learn_reports_the_seeded_start_and_returns_the_model_of_the_last_epoch(cfg: config.Config) -> None:
    """What the stage records before the first step, and what it writes after the last."""
    starts: list[tuple[np.ndarray, bool]] = []
    fit = loop.learn(cfg.train, data.generate(cfg.generate)[0], on_start=lambda *start: starts.append(start))
    seeded = loop.make_model(cfg.train.init_seed)  # the oracle: the seeded nn.Linear every method starts from
    [(init, compiled)] = starts
    assert np.array_equal(init, np.append(seeded.weight.detach(), seeded.bias.detach())) and not compiled
    path = fit.trajectory.path()
    assert np.array_equal(path[0], init) and len(path) == cfg.train.epochs + 1
    assert np.array_equal(path[-1], np.append(fit.model.weight.detach(), fit.model.bias.detach()))


def test_the_trajectory_streams_out_in_order_and_whole(cfg: config.Config) -> None:
    X, y = loop.as_arrays(*train_arrays(cfg))
    learner = loop.make_learner("nn", loop.make_model(0), X, y, "sgd", 0.1, 0.0)
    handed: list[tuple[int, np.ndarray]] = []
    t = loop.fit(learner, len(X), 30, on_epochs=lambda first, rows: handed.append((first, rows)), stream_epochs=7)
    assert [first for first, _ in handed] == [1, 8, 15, 22, 29]  # every 7 epochs, then the rest
    streamed = np.concatenate([rows for _, rows in handed])
    assert streamed.dtype == t.values.dtype and np.array_equal(streamed, t.values)  # the same values, bit for bit


def test_batches_follow_numpys_permutation_in_half_the_memory() -> None:
    parts = list(loop.batches(1003, 100, np.random.default_rng(9)))
    order = np.random.default_rng(9).permutation(1003)  # the oracle: the shuffle numpy itself makes
    assert [len(p) for p in parts] == [100] * 10 + [3]
    for i, part in enumerate(parts):
        assert part.dtype == np.int32 and np.array_equal(part, np.sort(order[i * 100 : (i + 1) * 100]))

"""The poem model: config validation, shapes for every cell, and the step API used for decoding."""

import pytest
import torch

from engine.model.network import CELLS, ModelConfig, PoemModel, compile_step

CELL_NAMES = sorted(CELLS)


def tiny(cell: str, **overrides) -> PoemModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=30, cell=cell, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.0) | overrides
    return PoemModel(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_forward_gives_logits_per_position_and_a_packed_state(cell):
    model = tiny(cell)
    tokens = torch.randint(0, 30, (3, 7))
    logits, state = model(tokens)
    assert logits.shape == (3, 7, 30)
    assert state.shape == (2, 3, model.config.state_dim)
    assert model.config.state_dim == (24 if cell == "lstm" else 12)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_init_state_is_zeros_of_the_state_shape(cell):
    model = tiny(cell)
    state = model.init_state(5)
    assert state.shape == (2, 5, model.config.state_dim) and not state.any()
    # A zero state is what the recurrent layers start from when given none.
    tokens = torch.randint(0, 30, (5, 4))
    torch.testing.assert_close(model(tokens)[0], model(tokens, state)[0])


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_step_by_step_decoding_equals_one_full_forward(cell):
    model = tiny(cell)
    tokens = torch.randint(0, 30, (4, 9))
    full_logits, full_state = model(tokens)
    state = model.init_state(4)
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        assert logits.shape == (4, 30)
        torch.testing.assert_close(logits, full_logits[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, full_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_batch_rows_are_independent_so_rows_can_join_and_leave(cell):
    model = tiny(cell)
    tokens = torch.randint(0, 30, (3, 6))
    _, state = model(tokens)
    # Dropping row 1 from the state and the batch changes nothing for rows 0 and 2.
    nxt = torch.randint(0, 30, (3,))
    all_rows, _ = model.step(nxt, state)
    kept, _ = model.step(nxt[[0, 2]], state[:, [0, 2]])
    torch.testing.assert_close(kept, all_rows[[0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_the_compiled_step_is_the_eager_step_bit_for_bit_at_any_batch_size(cell, num_layers):
    model = tiny(cell, num_layers=num_layers)
    step = compile_step(model)
    assert step is not model.step  # traced, not the fallback
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in (16, 1, 5, 40, 16, 255):  # traced at 16 rows; any other batch goes through the same graph
            tokens = torch.randint(0, 30, (rows,), generator=g)
            state = torch.randn(num_layers, rows, model.config.state_dim, generator=g)
            for _ in range(3):  # the executor may re-optimise the graph after its first runs
                (want, want_state), (got, got_state) = model.step(tokens, state), step(tokens, state)
                assert torch.equal(got, want) and torch.equal(got_state, want_state)


def test_a_step_that_cannot_be_traced_falls_back_to_the_eager_step(monkeypatch, caplog):
    model = tiny("gru")
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no tracer here")))
    assert compile_step(model) == model.step
    assert "could not be traced (no tracer here)" in caplog.text


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_parameter_count_matches_the_layers(cell):
    model = tiny(cell, num_layers=1)
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    recurrent = gates * (12 * 8 + 12 * 12 + 2 * 12)
    assert model.num_parameters() == 30 * 8 + recurrent + 12 * 30 + 30


def test_dropout_is_active_in_training_and_off_in_eval():
    model = tiny("lstm", dropout=0.5)
    tokens = torch.randint(0, 30, (2, 5))
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_input_dropout_acts_in_training_only_with_one_mask_for_a_rows_positions(cell):
    torch.manual_seed(0)
    model = tiny(cell, dropout=0.0, input_dropout=0.5)
    plain = tiny(cell, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 30, (2, 5))
    model.train()
    first = model(tokens)[0]
    assert not torch.equal(first, model(tokens)[0])
    # One mask for all of a row's positions: the same character, embedded twice in a row, is kept or dropped
    # alike at both positions, unit by unit.
    seen = {}
    model.embed.register_forward_hook(lambda module, args, out: seen.update(embedded=out))
    model.rnn.register_forward_pre_hook(lambda module, args: seen.update(fed=args[0]))
    model(torch.tensor([[3, 3, 3, 3]]))
    kept = seen["fed"] != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept)) and 0 < kept.float().mean() < 1
    # The module's own weights are untouched: eval is the model without the option.
    model.eval()
    assert torch.equal(model(tokens)[0], plain.eval()(tokens)[0])


@pytest.mark.parametrize("overrides,problem", [
    ({"cell": "transformer"}, "cell must be one of"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"hidden_dim": -1}, "hidden_dim"),
    ({"embed_dim": 1.5}, "embed_dim"),
    ({"num_layers": True}, "num_layers"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"input_dropout": True}, "input_dropout"),
    ({"input_dropout": -0.5}, "input_dropout"),
    ({"input_dropout": "0.1"}, "input_dropout"),
    ({"tie_embeddings": True, "embed_dim": 8, "hidden_dim": 12}, "tied embeddings need embed_dim == hidden_dim"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
])
def test_a_bad_config_is_rejected_naming_the_field(overrides, problem):
    with pytest.raises(ValueError, match=problem):
        ModelConfig(**({"vocab_size": 10} | overrides))


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    cfg = ModelConfig(vocab_size=10, cell="gru", hidden_dim=7)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # Options left off are not in the dict: engines from before them read such checkpoints.
    assert not {"tie_embeddings", "input_dropout"} & set(cfg.to_dict())
    regularised = ModelConfig(vocab_size=10, input_dropout=0.1)
    assert ModelConfig.from_dict(regularised.to_dict()) == regularised
    tied = ModelConfig(vocab_size=10, embed_dim=7, hidden_dim=7, tie_embeddings=True)
    assert ModelConfig.from_dict(tied.to_dict()) == tied
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict(cfg.to_dict() | {"attention": True})
    with pytest.raises(TypeError):
        ModelConfig.from_dict({"cell": "gru"})  # vocab_size missing


def test_tied_embeddings_hold_one_matrix_for_input_and_output(tmp_path):
    from engine.model.checkpoint import load_checkpoint, save_checkpoint
    from engine.poem.vocab import Vocab

    vocab = Vocab.build(["春风吹月白，夜雨落花红。"], 1, 100)
    model = tiny("lstm", vocab_size=len(vocab), embed_dim=12, hidden_dim=12, tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert "head.weight" not in model.state_dict()  # one copy on disk, one in the optimiser
    untied = tiny("lstm", vocab_size=len(vocab), embed_dim=12, hidden_dim=12)
    assert untied.num_parameters() - model.num_parameters() == len(vocab) * 12
    # The shared matrix learns from both ends: a gradient through the output alone reaches the embedding.
    logits, _ = model(torch.tensor([[1]]))
    logits[0, 0, 5].backward()
    assert model.embed.weight.grad[5].abs().sum() > 0
    save_checkpoint(tmp_path / "tied.safetensors", model, vocab)
    loaded = load_checkpoint(tmp_path / "tied.safetensors").model
    assert loaded.head.weight is loaded.embed.weight
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    step = compile_step(loaded)
    rows, state = torch.zeros(16, dtype=torch.long), loaded.init_state(16)
    assert torch.equal(step(rows, state)[0], loaded.step(rows, state)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_step_api_runs_on_cuda_and_matches_cpu(cell):
    model = tiny(cell)
    tokens = torch.randint(0, 30, (2, 5))
    cpu_logits, _ = model(tokens)
    gpu = model.to("cuda")
    state = gpu.init_state(2)
    assert state.device.type == "cuda"
    for t in range(5):
        logits, state = gpu.step(tokens[:, t].cuda(), state)
    torch.testing.assert_close(logits.cpu(), cpu_logits[:, -1], rtol=1e-3, atol=1e-3)

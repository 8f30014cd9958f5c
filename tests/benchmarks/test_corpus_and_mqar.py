"""Fast CPU tests of the benchmark data (stdlib byte corpus, MQAR generator) and tiny in-process smoke runs of
benchmarks/lm/demo.py, benchmarks/lm/compare.py, benchmarks/mqar/train_mqar.py and
benchmarks/distributed/train_fsdp.py (single process)."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
LM = os.path.join(ROOT, 'benchmarks', 'lm')
MQAR = os.path.join(ROOT, 'benchmarks', 'mqar')
for p in (ROOT, LM, MQAR):
    if p not in sys.path:
        sys.path.insert(0, p)


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


import corpus  # noqa: E402  (benchmarks/lm/corpus.py)
import mqar  # noqa: E402  (benchmarks/mqar/mqar.py)

assert os.path.dirname(os.path.abspath(corpus.__file__)) == LM
assert os.path.dirname(os.path.abspath(mqar.__file__)) == MQAR


pytestmark = pytest.mark.usefixtures('one_cpu_thread')


# ----------------------------------------------------------------------------------------------------- corpus


@pytest.fixture
def fake_stdlib(tmp_path):
    files = {'a.py': b'import os\n', 'b.py': b'x = 1\n', 'pkg/__init__.py': b'', 'pkg/mod.py': b'def f():\n  pass\n',
             'notes.txt': b'not python', 'site-packages/third.py': b'third party', 'test/test_a.py': b'assert 1\n',
             'pkg/tests/t.py': b'assert 2\n', 'idlelib/idle_test/x.py': b'pass\n'}
    for rel, data in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


def test_list_files_skips_third_party_tests_and_non_python(fake_stdlib):
    assert corpus.list_files(str(fake_stdlib)) == ['a.py', 'b.py', 'pkg/__init__.py', 'pkg/mod.py']
    with_tests = corpus.list_files(str(fake_stdlib), include_tests=True)
    assert 'test/test_a.py' in with_tests and 'pkg/tests/t.py' in with_tests
    assert 'idlelib/idle_test/x.py' in with_tests
    assert not any('site-packages' in f for f in with_tests)
    assert with_tests == sorted(with_tests)


def test_encode_files_layout(fake_stdlib):
    files = corpus.list_files(str(fake_stdlib))
    stream = corpus.encode_files(files, str(fake_stdlib))
    expected = []
    for f in files:
        expected += [corpus.BOS] + list((fake_stdlib / f).read_bytes()) + [corpus.EOS]
    assert stream.tolist() == expected
    assert corpus.decode(stream[:12]) == '<bos>import os\n<eos>'


@pytest.fixture(scope='module')
def stdlib_corpus():
    return corpus.ByteCorpus.load()


def test_split_disjoint_complete_deterministic(stdlib_corpus):
    c = stdlib_corpus
    files = corpus.list_files(c.root)
    assert set(c.train_files).isdisjoint(c.val_files)
    assert sorted(c.train_files + c.val_files) == files
    assert c.train_files == sorted(c.train_files) and c.val_files == sorted(c.val_files)
    frac = len(c.val_files) / len(files)
    assert 0.01 < frac < 0.15, frac
    again = corpus.ByteCorpus.load()
    assert again.train_files == c.train_files and again.val_files == c.val_files
    assert again.fingerprint == c.fingerprint
    assert torch.equal(again.val, c.val)
    # the split is a function of the path alone, whatever the other files
    assert corpus.split_files(c.val_files[:3])[1] == c.val_files[:3]
    assert not any(corpus.is_validation(f, 0.05) for f in c.train_files[:50])
    assert not any('site-packages' in f for f in files)


def test_streams(stdlib_corpus):
    c = stdlib_corpus
    for stream, files in ((c.train, c.train_files), (c.val, c.val_files)):
        assert stream.dtype == torch.int16
        assert int(stream.min()) >= 0 and int(stream.max()) < corpus.VOCAB_SIZE
        assert int((stream == corpus.BOS).sum()) == len(files) == int((stream == corpus.EOS).sum())
        assert int(stream[0]) == corpus.BOS and int(stream[-1]) == corpus.EOS
    first = c.val_files[0]
    with open(os.path.join(c.root, *first.split('/')), 'rb') as f:
        data = f.read()
    assert c.val[1:1 + len(data)].tolist() == list(data)


def test_train_batches_seeded(stdlib_corpus):
    s = stdlib_corpus.train
    a, b, c = (corpus.TrainBatches(s, 4, 33, seed=seed) for seed in (1, 1, 2))
    xa, xb, xc = next(a), next(b), next(c)
    assert xa.shape == (4, 33) and xa.dtype == torch.long
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert not torch.equal(next(a), xa)  # the stream moves on
    # each row is a contiguous window of the stream: replay the offsets
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, s.numel() - 33 + 1, (4,), generator=g)
    for row, st in zip(xa, starts.tolist()):
        assert torch.equal(row, s[st:st + 33].long())


def test_fixed_windows(stdlib_corpus):
    v = stdlib_corpus.val
    w1, w2 = corpus.fixed_windows(v, 16, 65), corpus.fixed_windows(v, 16, 65)
    assert w1.shape == (16, 65) and torch.equal(w1, w2)
    assert torch.equal(w1[0], v[:65].long()) and torch.equal(w1[-1], v[-65:].long())
    short = torch.arange(100, dtype=torch.int16)
    assert corpus.fixed_windows(short, 16, 30).shape == (3, 30)
    with pytest.raises(ValueError):
        corpus.fixed_windows(short, 1, 101)


# ------------------------------------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize('n,L,D,V', [(64, 64, 4, 64), (40, 256, 16, 8192), (8, 1024, 64, 8192), (600, 32, 8, 20)])
def test_mqar_structure(n, L, D, V):
    b = mqar.multiquery_ar(n, L, D, V, seed=3)
    assert b.inputs.shape == b.labels.shape == (n, L)
    assert b.inputs.dtype == b.labels.dtype == torch.long
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < V
    q = b.labels != mqar.IGNORE
    assert (q.sum(1) == D).all()
    assert not q[:, :2 * D].any()
    keys, values = b.inputs[:, 0:2 * D:2], b.inputs[:, 1:2 * D:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    mqar.check_example(b.inputs, b.labels, D)  # every query's label is the value bound to its key


def test_mqar_seeding():
    a = mqar.multiquery_ar(20, 128, 8, 256, seed=5)
    b = mqar.multiquery_ar(20, 128, 8, 256, seed=5)
    c = mqar.multiquery_ar(20, 128, 8, 256, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    d = mqar.multiquery_ar(mqar.BLOCK + 3, 128, 8, 256, seed=5)  # several blocks
    assert torch.equal(d.inputs, mqar.multiquery_ar(mqar.BLOCK + 3, 128, 8, 256, seed=5).inputs)
    mqar.check_example(d.inputs[-5:], d.labels[-5:], 8)


def test_mqar_power_law_favours_early_queries():
    L, D = 512, 8
    b = mqar.multiquery_ar(400, L, D, 8192, seed=0)
    pos = (b.labels != mqar.IGNORE).nonzero()[:, 1].float()
    uniform_mean = 2 * D + (L - 2 * D) / 2
    assert pos.mean() < 0.8 * uniform_mean
    assert pos.max() > L / 2  # but not only early ones


def test_mqar_check_catches_errors():
    b = mqar.multiquery_ar(4, 64, 4, 64, seed=0)
    bad = b.labels.clone()
    i = int((bad[0] != mqar.IGNORE).nonzero()[0])
    bad[0, i] = (bad[0, i] - 32 + 1) % 32 + 32  # another value
    with pytest.raises(AssertionError):
        mqar.check_example(b.inputs, bad, 4)
    shifted = torch.roll(b.labels, 1, dims=1)  # off-by-one alignment
    with pytest.raises(AssertionError):
        mqar.check_example(b.inputs, shifted, 4)


def test_mqar_argument_checks():
    with pytest.raises(ValueError):
        mqar.multiquery_ar(2, 60, 16, 8192)
    with pytest.raises(ValueError):
        mqar.multiquery_ar(2, 64, 4, 8)


# ------------------------------------------------------------------------------------------------ smoke runs


def test_demo_smoke(tmp_path):
    demo = load(os.path.join(LM, 'demo.py'), 'lm_demo')
    out = tmp_path / 'demo.json'
    m = demo.main(['--device', 'cpu', '--steps', '6', '--hidden-size', '32', '--head-dim', '32', '--layers', '1',
                   '--seq-len', '32', '--batch-size', '4', '--val-windows', '4', '--gen-tokens', '5', '--lr', '1e-2',
                   '--cg-steps', '3', '--eval-cg-max', '10', '--table-decode-tokens', '3', '--no-progress',
                   '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved['val_end']['loss'] == pytest.approx(m['val_end']['loss'])
    assert math.isfinite(m['val_end']['loss'])
    assert m['val_end']['loss'] < m['val_start']['loss'] - 0.05  # it learns something in 6 steps
    assert len(m['train_losses']) == 6
    st = m['cg_tol_eval']
    assert set(st['layers']) == {0}
    assert 0 < st['layers'][0]['mean'] <= st['layers'][0]['max'] <= 10
    rows = m['test_time_table']
    assert [(r['cg_steps'], r['cg_tol']) for r in rows] == [(1, None), (2, None), (5, None), (10, None), (30, None),
                                                            (30, 1e-2), (30, 1e-3), (30, 1e-4)]
    assert rows[0]['mean_iters'] == 1.0 and all(r['mean_iters'] <= r['cg_steps'] for r in rows)
    assert rows[-1]['mean_iters'] >= rows[-3]['mean_iters']  # a tighter tolerance never runs fewer iterations
    assert rows[-1]['loss'] == pytest.approx(rows[4]['loss'], abs=1e-3)
    assert all(r['prefill_ms_per_token'] > 0 and r['decode_ms_per_token'] > 0 for r in rows)
    assert isinstance(m['sample'], str) and m['sample'].startswith('def ')


def test_compare_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs without --out write their default plot (with matplotlib) to the cwd
    compare = load(os.path.join(LM, 'compare.py'), 'lm_compare')
    out = compare.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '2', '--no-progress',
                        '--tt-steps', '0,2', '--out', str(tmp_path / 'c.json')])
    (r,) = out['results']
    assert r['ok'] and r['name'] == 'mesa'
    assert [p['cg'] for p in r['test_time_compute']] == ['0', '2', 'tol 0.0001']
    assert len(r['curve']) == 3 and r['curve'][0]['time'] == 0.0
    table = compare.tables(out['results'], out['config'])
    assert '| mesa |' in table and '| tol 0.0001 |' in table
    assert compare.interp([{'time': 0., 'val_loss': 4.}, {'time': 2., 'val_loss': 2.}], 1.) == pytest.approx(3.)
    merged = compare.main(['--merge', str(tmp_path / 'c.json'), str(tmp_path / 'c.json'),
                           '--png', str(tmp_path / 'm.png')])
    assert len(merged['results']) == 2
    with pytest.raises(SystemExit):
        compare.main(['--models', 'gla', '--tiny', '--device', 'cpu'])
    # Mesa with the Mamba-style forget gate: its own row, with its CG note and test-time curve
    out = compare.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '1', '--no-progress',
                        '--tt-steps', '0', '--mesa-mamba-gate'])
    (r,) = out['results']
    assert r['ok'] and r['name'] == 'mesa+mamba_gate' and r['info']['use_mamba_gate']
    table = compare.tables(out['results'], out['config'])
    assert '| mesa+mamba_gate |' in table and 'mean CG iters' in table and '| tol 0.0001 |' in table


def test_train_mqar_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its default plot (with matplotlib) goes to the cwd
    tm = load(os.path.join(MQAR, 'train_mqar.py'), 'mqar_train')
    out = tm.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '2', '--no-progress'])
    (r,) = out['results']
    assert r['ok'] and 0.0 <= r['acc'] <= 1.0 and math.isfinite(r['final_loss'])
    assert '| mesa |' in tm.best_table(out['results'], out['config'])
    assert r['steps_done'] == 2
    # a time budget stops training early (here after the first step) and still scores the model
    out = tm.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '50', '--budget-s', '0',
                   '--no-progress'])
    (r,) = out['results']
    assert r['ok'] and r['steps_done'] == 1 and r['loss_curve'] == [(1, round(r['final_loss'], 5))]
    # Mesa with the Mamba-style forget gate is its own row
    out = tm.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '1', '--mesa-mamba-gate',
                   '--no-progress'])
    (r,) = out['results']
    assert r['ok'] and r['model'] == 'mesa+mamba_gate' and r['info']['use_mamba_gate'] and '| mesa+mamba_gate |' in tm.best_table([r], out['config'])
    out = tm.main(['--models', 'mesa', '--tiny', '--device', 'cpu', '--steps', '1', '--mesa-gate-bias', '3',
                   '--no-progress'])
    (r,) = out['results']
    assert r['ok'] and r['model'] == 'mesa+gate_bias3' and r['info']['gate_bias'] == 3.0


def test_mqar_query_logits_are_the_full_logits_at_the_queries():
    tm = load(os.path.join(MQAR, 'train_mqar.py'), 'mqar_train')
    zoo = load(os.path.join(LM, 'zoo.py'), 'lm_zoo')
    model, _ = zoo.build_model('mesa', 64, 2, 32, torch.device('cpu'), head_dim=32, cg_steps=5)
    data = mqar.multiquery_ar(3, 64, 4, 32, seed=0)
    mask = data.labels != mqar.IGNORE
    full = model(input_ids=data.inputs).logits
    got = tm.query_logits(model, data.inputs, mask)
    assert got.shape == (int(mask.sum()), 32)
    torch.testing.assert_close(got, full[mask], rtol=1e-6, atol=1e-6)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match='final_logit_softcapping'):
        tm.query_logits(model, data.inputs, mask)


@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_train_fsdp_single_process_check(monkeypatch, optimizer):
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)
    tf = load(os.path.join(ROOT, 'benchmarks', 'distributed', 'train_fsdp.py'), 'dist_train_fsdp')
    assert tf.main(['--check', '--device', 'cpu', '--tiny', '--steps', '2', '--optimizer', optimizer]) == 0


def test_zoo_mesa_gate_variants(monkeypatch):
    zoo = load(os.path.join(LM, 'zoo.py'), 'lm_zoo')
    cpu = torch.device('cpu')
    model, info = zoo.build_model('mesa', 64, 2, 32, cpu, head_dim=32, mesa_gate_bias=2.5)
    biases = [layer.attn.a_proj.bias for layer in model.model.layers]
    assert info['gate_bias'] == 2.5 and len(biases) == 2 and all(bool((b == 2.5).all()) for b in biases)
    _, info = zoo.build_model('mesa', 64, 1, 32, cpu, head_dim=32)
    assert 'gate_bias' not in info and 'use_mamba_gate' not in info
    with pytest.raises(ValueError, match='mesa_gate_bias'):
        zoo.build_model('mesa', 64, 1, 32, cpu, head_dim=32, mesa_gate_bias=1.0, use_mamba_gate=True)
    assert zoo.mesa_variant('mesa', {'mesa_mamba_gate': True}) == ({'use_mamba_gate': True}, 'mesa+mamba_gate')
    assert zoo.mesa_variant('mesa', {'mesa_gate_bias': 3.0}) == ({'mesa_gate_bias': 3.0}, 'mesa+gate_bias3')
    assert zoo.mesa_variant('gla', {'mesa_mamba_gate': True, 'mesa_gate_bias': 3.0}) == ({}, 'gla')
    # fla's MesaNet has the same sigmoid gate: its own option and row, and Mesa's options leave it alone
    assert zoo.mesa_variant('mesanet', {'mesanet_gate_bias': 3.0}) == ({'mesanet_gate_bias': 3.0}, 'mesanet+gate_bias3')
    assert zoo.mesa_variant('mesanet', {'mesa_gate_bias': 3.0, 'mesa_mamba_gate': True}) == ({}, 'mesanet')
    assert zoo.mesa_variant('mesa', {'mesanet_gate_bias': 3.0}) == ({}, 'mesa')
    monkeypatch.setattr(zoo, 'GPU_ONLY', frozenset())  # MesaNet is built (not run) on the CPU here
    mesanet, info = zoo.build_model('mesanet', 64, 2, 32, cpu, head_dim=32, mesanet_gate_bias=-1.5)
    assert info['gate_bias'] == -1.5
    assert all(bool((layer.attn.a_proj.bias == -1.5).all()) for layer in mesanet.model.layers)
    _, info = zoo.build_model('mesanet', 64, 1, 32, cpu, head_dim=32)
    assert 'gate_bias' not in info


def test_sdpa_stand_in_for_flash_attn_is_causal_attention():
    """zoo.py's flash_attn_func stand-in (used when flash-attn is missing) against a naive causal softmax."""
    zoo = load(os.path.join(LM, 'zoo.py'), 'lm_zoo')
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 7, 3, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum('bihd,bjhd->bhij', q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf'))
    ref = torch.einsum('bhij,bjhd->bihd', scores.softmax(-1), v)
    out = zoo._sdpa_flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))
    torch.testing.assert_close(out, ref)
    # grouped-query attention: 3 query heads share 1 key/value head
    out_gqa = zoo._sdpa_flash_attn_func(q, k[:, :, :1], v[:, :, :1], causal=True)
    ref_gqa = zoo._sdpa_flash_attn_func(q, k[:, :, :1].expand(-1, -1, H, -1), v[:, :, :1].expand(-1, -1, H, -1),
                                        causal=True)
    torch.testing.assert_close(out_gqa, ref_gqa)
    with pytest.raises(NotImplementedError):
        zoo._sdpa_flash_attn_func(q, k, v, causal=True, window_size=(3, 0))


def test_report_tables_show_failures_and_best_lr():
    compare = load(os.path.join(LM, 'compare.py'), 'lm_compare')
    ok = {'name': 'gla', 'ok': True, 'info': {'params': 1e6}, 'val_loss': 2.0, 'bpb': 2.9, 'train_time': 10.0,
          'tokens_per_s': 100.0, 'peak_memory_mb': None, 'curve': [{'time': 0.0, 'val_loss': 5.0},
                                                                    {'time': 10.0, 'val_loss': 2.0}]}
    slow = dict(ok, name='gated_deltanet', train_time=20.0, val_loss=1.0,
                curve=[{'time': 0.0, 'val_loss': 5.0}, {'time': 20.0, 'val_loss': 1.0}])
    table = compare.tables([ok, slow, {'name': 'mesanet', 'ok': False, 'error': 'RuntimeError: boom'}],
                           {'steps': 3})
    assert '| mesanet | | FAILED |' in table and 'boom' in table
    assert '| gated_deltanet | 1.00M | 1.0000 |' in table and '| 3.0000 |' in table  # at t = 10 s: 3.0
    tm = load(os.path.join(MQAR, 'train_mqar.py'), 'mqar_train')
    rows = [{'model': 'mesa', 'width': 64, 'seq_len': 256, 'lr': lr, 'acc': acc, 'ok': True}
            for lr, acc in ((1e-3, 0.4), (3e-3, 0.9))]
    rows.append({'model': 'gla', 'width': 64, 'seq_len': 256, 'lr': 1e-3, 'ok': False, 'error': 'x'})
    t = tm.best_table(rows, {'lrs': [1e-3, 3e-3]})
    assert '| mesa | 0.900 |' in t and '| gla | FAILED |' in t
    # several seeds: the learning rate with the best mean, then (min-max, seeds); a failed seed is left out
    seeds = [{'model': 'mesa', 'width': 64, 'seq_len': 256, 'lr': lr, 'seed': s, 'acc': acc, 'ok': True}
             for lr, s, acc in ((1e-3, 0, 0.8), (1e-3, 1, 0.6), (3e-3, 0, 1.0), (3e-3, 1, 0.2), (3e-3, 2, 0.3))]
    seeds.append({'model': 'mesa', 'width': 64, 'seq_len': 256, 'lr': 1e-3, 'seed': 2, 'ok': False, 'error': 'y'})
    t = tm.best_table(seeds, {'lrs': [1e-3, 3e-3]})
    assert '| mesa | 0.700 (0.600-0.800, 2) |' in t and 'FAILED mesa d=64 L=256 lr=0.001 seed=2' in t


def test_warm_start_replay():
    ws = load(os.path.join(LM, 'warm_start.py'), 'lm_warm_start')
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 8, 8, generator=gen, dtype=torch.float64)
    a = m @ m.mT + 0.1 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x, its = ws.cg_iterations(a, b, torch.zeros_like(b), 1e-10, 100)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    assert ((its >= 1) & (its <= 20)).all()
    _, its = ws.cg_iterations(a, b, x, 1e-6, 100)       # already at the solution: no iteration
    assert (its == 0).all()
    out = ws.main(['--steps', '3', '--windows', '1', '--seq-len', '24', '--tols', '1e-3', '--no-progress'])
    assert set(out['rows']) == {(0, 1e-3), (1, 1e-3)}
    for means in out['rows'].values():
        assert set(means) == set(ws.STARTS) and all(0 < v <= 100 for v in means.values())


def test_mqar_grid_smoke(tmp_path):
    """grid.py on the CPU: a warm-up per row, one process per cell, then the merged table and JSON."""
    grid = load(os.path.join(MQAR, 'grid.py'), 'mqar_grid')
    rc = grid.main(['--device', 'cpu', '--jobs', '2', '--models', 'mesa', '--mesa-gate-rows', 'gate_bias3',
                    '--widths', '32', '--seq-lens', '32,64', '--out-dir', str(tmp_path), '--', '--tiny', '--steps', '2'])
    assert rc == 0
    merged = json.loads((tmp_path / 'merged.json').read_text())
    cells = {(r['model'], r['seq_len']) for r in merged['results'] if r['ok'] and r['steps_done'] == 2}
    assert cells == {(m, L) for m in ('mesa', 'mesa+gate_bias3') for L in (32, 64)}
    assert sorted(p.name for p in tmp_path.glob('_warmup_*.log')) == ['_warmup_mesa.log', '_warmup_mesa_gate_bias3.log']
    with pytest.raises(SystemExit):
        grid.main(['--device', 'cpu', '--mesa-gate-rows', 'bogus', '--out-dir', str(tmp_path)])
    assert grid.rows(grid.parse_args(['--models', '', '--mesa-gate-rows', 'mesanet_gate_bias3,gate_bias2'])) == [
        ('mesanet+gate_bias3', ['--models', 'mesanet', '--mesanet-gate-bias', '3.0']),
        ('mesa+gate_bias2', ['--models', 'mesa', '--mesa-gate-bias', '2.0'])]
    # --seeds: one process per cell and seed, each told its seed after the options passed through
    args = grid.parse_args(['--models', 'gla', '--mesa-gate-rows', '', '--seeds', '3,4', '--out-dir', 'o', '--',
                            '--seed', '9'])
    todo = grid.jobs(args, [32], [64])
    assert [j['name'] for j in todo] == ['gla_d32_L64_s3', 'gla_d32_L64_s4']
    assert [j['cmd'][j['cmd'].index('--seed', j['cmd'].index('9')) + 1] for j in todo] == ['3', '4']

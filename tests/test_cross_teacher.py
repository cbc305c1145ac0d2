"""Any teacher for any student: the teacher's own chat template, and a teacher with another tokenizer read
through the byte alignment, checked against direct computations; the start-of-run choice and refusals."""

import copy

import pytest
import torch

from conftest import LiveServer, read_jsonl, tiny_train_overrides
from opd.config import load_config
from opd.errors import OpdError
from opd.losses import reverse_kl_advantages
from opd.models import chat_prompt_ids, load_model, load_tokenizer, save_model
from opd.rollouts import pack_pairs
from opd.samplers.local import sample
from opd.scoring import head_logprobs
from opd.setup import open_session
from opd.teachers import LocalTeacher, RemoteTeacher, TeacherView
from opd.trainer import train
from opd.zoo import make_model

CPU = torch.device("cpu")
PROMPTS = ["Compute 1+2", "Compute 3*(4+5)-2, please", "hello über ✓"]
COMPLETIONS = ["= 3\nAnswer: 3", "= 3*9-2\n= 25\nAnswer: 25", "the end, café"]


def conversations(texts=PROMPTS, samples=2):
    """Each prompt's messages, ``samples`` rows each (one shared object per prompt, as the trainer passes)."""
    return [m for m in ([{"role": "user", "content": t}] for t in texts) for _ in range(samples)]


def batch(tokenizer, completions, messages, eos=True):
    """Student rollouts answering ``messages`` with the given completion ids (EOS appended if ``eos``)."""
    prompts = [chat_prompt_ids(tokenizer, m) for m in messages]
    rows = [ids + ([tokenizer.eos_token_id] if eos else []) for ids in completions]
    rollouts = pack_pairs(prompts, rows, tokenizer.pad_token_id)
    groups = {key: i for i, key in enumerate(dict.fromkeys(id(m) for m in messages))}
    rollouts.prompt_index = torch.tensor([groups[id(m)] for m in messages])
    rollouts.sampler_logprobs = -torch.rand(rollouts.tokens.shape, generator=torch.Generator().manual_seed(0)) \
        * rollouts.completion_mask * 4
    return rollouts


def canonical(tokenizer, samples=2):
    return [tokenizer.encode(c, add_special_tokens=False) for c in COMPLETIONS for _ in range(samples)]


def test_identical_tokenizers_through_the_alignment_give_the_direct_advantages(model_dirs, tokenizer):
    teacher = LocalTeacher(load_model(model_dirs["teacher"], CPU, torch.float32), len(tokenizer))
    messages = conversations()
    rollouts = batch(tokenizer, canonical(tokenizer), messages)
    direct = TeacherView(teacher, tokenizer, tokenizer)
    aligned = TeacherView(teacher, tokenizer, tokenizer, path="aligned")
    assert direct.path == "shared"
    one, other = direct.score(rollouts, messages), aligned.score(rollouts, messages)
    assert one.chunks is None and other.chunk_count == other.single_token_chunks == rollouts.num_completion_tokens
    assert torch.equal(one.logprobs, other.logprobs)
    mask = rollouts.completion_mask
    assert torch.equal(reverse_kl_advantages(rollouts.sampler_logprobs, one.logprobs, mask, 1.0, 0.9),
                       reverse_kl_advantages(rollouts.sampler_logprobs, other.logprobs, mask, 1.0, 0.9))


def split_token(tokenizer) -> tuple[int, int, int]:
    """A token id and two ids whose bytes spell it: a non-canonical way to sample the same text."""
    from opd.teachers.alignment import token_bytes

    table = token_bytes(tokenizer)
    ids = {b: i for i, b in enumerate(table) if i not in tokenizer.added_tokens_decoder}
    for token, data in enumerate(table):
        if token in tokenizer.added_tokens_decoder or len(data) < 3 or not data.isalpha():
            continue
        for cut in range(1, len(data)):
            if data[:cut] in ids and data[cut:] in ids:
                return token, ids[data[:cut]], ids[data[cut:]]
    raise AssertionError("no splittable token")


def test_a_non_canonical_completion_scores_as_the_teacher_token_it_spells(model_dirs, tokenizer):
    model = load_model(model_dirs["teacher"], CPU, torch.float32).eval()
    teacher = LocalTeacher(model, len(tokenizer))
    whole, left, right = split_token(tokenizer)
    messages = conversations(PROMPTS[:1], samples=1)
    prefix = tokenizer.encode("= 3 ", add_special_tokens=False)
    sampled = batch(tokenizer, [prefix + [left, right]], messages)
    written = batch(tokenizer, [prefix + [whole]], messages)  # what the teacher reads: the canonical ids
    got = TeacherView(teacher, tokenizer, tokenizer, path="aligned").score(sampled, messages)
    want = TeacherView(teacher, tokenizer, tokenizer).score(written, messages).logprobs
    columns = sampled.completion_mask[0].nonzero()[:, 0]
    n = len(prefix)
    chunks = got.chunks[0, columns].tolist()
    assert chunks == list(range(n)) + [n, n, n + 1]  # the two pieces are one chunk; EOS its own
    values, expected = got.logprobs[0, columns], want[0, written.completion_mask[0] > 0]
    assert torch.equal(values[:n], expected[:n])
    # the first piece: the teacher's log-prob of that token exactly (one vocabulary: it means "not longer"),
    # read where the teacher reads the whole token
    prompt = chat_prompt_ids(tokenizer, messages[0]) + prefix
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1:]
        exactly = head_logprobs(model.get_output_embeddings(), hidden, len(tokenizer))[0, left]
    torch.testing.assert_close(values[n], exactly, rtol=0, atol=1e-5)
    # the rest of the text and the EOS make up the teacher's log-prob of its own reading, exactly
    torch.testing.assert_close(values.sum(), expected.sum(), rtol=0, atol=1e-5)


def sequence_logprobs(model, ids: list[int], start: int, vocab: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start, one unpadded forward pass (the independent computation)."""
    tokens = torch.tensor([ids])
    hidden = model.get_decoder()(input_ids=tokens).last_hidden_state[0, start - 1 : -1]
    return head_logprobs(model.get_output_embeddings(), hidden, vocab).gather(-1, tokens[0, start:, None])[:, 0]


def test_the_shares_sum_to_the_sequence_log_ratio_in_float64(model_dirs, cross_dirs, tokenizer, other_tokenizer):
    student = load_model(model_dirs["student"], CPU, torch.float64).eval()
    teacher_model = load_model(cross_dirs["teacher"], CPU, torch.float64).eval()
    view = TeacherView(LocalTeacher(teacher_model, len(other_tokenizer)), tokenizer, other_tokenizer)
    assert view.path == "aligned"
    messages = conversations(samples=3)
    prompts = [chat_prompt_ids(tokenizer, m) for m in messages]
    with torch.no_grad():  # the student's own samples: random ids, non-canonical and not always valid UTF-8
        drawn = sample(student, prompts[::3], samples_per_prompt=3, max_new_tokens=12, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                       generator=torch.Generator().manual_seed(3))
        closed = [ids if ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]
                  for ids in drawn.completion_ids()]
        rollouts = pack_pairs(prompts, closed, tokenizer.pad_token_id)
        scored = view.score(rollouts, messages)
    assert scored.logprobs.dtype == torch.float64 and scored.single_token_chunks < scored.chunk_count
    student_lp = torch.randn(rollouts.tokens.shape, dtype=torch.float64) * rollouts.completion_mask
    advantages = reverse_kl_advantages(student_lp, scored.logprobs, rollouts.completion_mask)
    for row, completion in enumerate(closed):
        ids, _ = view.translate(completion)
        their_prompt = view.teacher_prompt(messages[row])
        with torch.no_grad():
            independent = sequence_logprobs(teacher_model, their_prompt + ids, len(their_prompt),
                                            len(other_tokenizer)).sum()
        sequence_ratio = student_lp[row].sum() - independent
        torch.testing.assert_close(-advantages[row].sum(), sequence_ratio, rtol=0, atol=1e-10)
        torch.testing.assert_close(scored.logprobs[row].sum(), independent, rtol=0, atol=1e-10)
        columns = rollouts.completion_mask[row] > 0
        assert (scored.logprobs[row, columns] <= 1e-12).all()  # each share is a log-probability
    # chunks: numbered across the batch in order, -1 outside the completions
    inside = rollouts.completion_mask > 0
    assert (scored.chunks[~inside] == -1).all()
    numbers = scored.chunks[inside]
    assert (numbers[1:] >= numbers[:-1]).all() and int(numbers.max()) + 1 == scored.chunk_count
    # each event read from the teacher's full distribution at its position, against a forward pass of its own
    translated = [view.translate(ids) for ids in closed]
    wanted = view.wanted_events(closed, translated)
    covers = view.cover_logprobs(wanted, [len(ids) for ids, _ in translated], view.teacher.score_with_hidden(
        pack_pairs([view.teacher_prompt(m) for m in messages], [ids for ids, _ in translated],
                   other_tokenizer.pad_token_id))[1])
    assert len(covers) > 5
    for (row, k), value in covers.items():
        j, event = wanted[row][k]
        their_prompt = view.teacher_prompt(messages[row])
        context = their_prompt + translated[row][0][:j]
        with torch.no_grad():
            hidden = teacher_model.get_decoder()(input_ids=torch.tensor([context])).last_hidden_state[0, -1:]
            logprobs = head_logprobs(teacher_model.get_output_embeddings(), hidden, len(other_tokenizer))[0]
        assert abs(value - float(torch.logsumexp(logprobs[event], 0))) < 1e-10


THINKING_TEMPLATE = (
    "<|im_start|>system\nYou are a careful teacher.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def own_template_dir(tmp_path_factory, tokenizer, model_dirs):
    """The tiny teacher with a chat template of its own: a system prompt, and empty thinking tags."""
    path = tmp_path_factory.mktemp("own") / "teacher"
    theirs = copy.deepcopy(tokenizer)
    theirs.chat_template = THINKING_TEMPLATE
    save_model(load_model(model_dirs["teacher"], CPU, torch.float32), theirs, path)
    return path


def test_a_teacher_with_its_own_template_scores_the_completion_after_its_rendering(own_template_dir, tokenizer):
    model = load_model(own_template_dir, CPU, torch.float32).eval()
    theirs = load_tokenizer(own_template_dir)
    messages = conversations()
    rollouts = batch(tokenizer, canonical(tokenizer), messages)
    view = TeacherView(LocalTeacher(model, len(theirs)), tokenizer, theirs)
    assert view.path == "own"
    prompt = view.teacher_prompt(messages[0])
    assert theirs.decode(prompt).endswith("user\nCompute 1+2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "You are a careful teacher." in theirs.decode(prompt)
    scored = view.score(rollouts, messages, hidden=True)
    with torch.no_grad():
        plain = TeacherView(LocalTeacher(model, len(theirs)), tokenizer, theirs, template="student")
        assert plain.path == "shared"
        student_rendering = plain.score(rollouts, messages).logprobs
    mask = rollouts.completion_mask > 0
    for row, completion in enumerate(rollouts.completion_ids()):
        prompt = view.teacher_prompt(messages[row])
        with torch.no_grad():
            want = sequence_logprobs(model, prompt + completion, len(prompt), len(theirs))
            hidden = model.get_decoder()(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0]
        torch.testing.assert_close(scored.logprobs[row, mask[row]], want, rtol=0, atol=1e-5)
        assert (scored.logprobs[row, ~mask[row]] == 0).all()
        start = int(mask[:row].sum())
        torch.testing.assert_close(scored.hidden[start : start + len(completion)],
                                   hidden[len(prompt) - 1 : -1], rtol=0, atol=1e-5)
    assert (scored.logprobs - student_rendering).abs().max() > 1e-3  # the rendering matters to the teacher
    assert scored.teacher_prompt_lengths == [len(view.teacher_prompt(m)) for m in messages]  # its FLOPs
    assert scored.teacher_completion_lengths == [len(ids) for ids in rollouts.completion_ids()]
    with pytest.raises(ValueError, match="^2 conversations for 6 rows$"):
        view.score(rollouts, messages[:2])


def test_the_paths_say_what_they_are(own_template_dir, tokenizer, other_tokenizer, model_dirs):
    from opd.teachers.view import choose_path

    model = LocalTeacher(load_model(model_dirs["teacher"], CPU, torch.float32), len(tokenizer))
    assert TeacherView(model, tokenizer, tokenizer).describe([]) == (
        "teacher reads the student's tokens (one tokenizer, one chat template)")
    assert TeacherView(model, tokenizer, load_tokenizer(own_template_dir)).describe([]) == (
        "teacher's chat template differs: it reads the prompt in its own template, then the student's completion "
        "ids (teacher_template=student keeps the student's rendering)")
    aligned = TeacherView(model, tokenizer, other_tokenizer)
    texts = ["Compute 12+(3*45)", "über 7"]
    alignments = [aligned.translate(tokenizer.encode(t, add_special_tokens=False))[1] for t in texts]
    share = sum(a.single_token_chunks() for a in alignments) / sum(a.count for a in alignments)
    assert 0 < share < 1
    assert aligned.describe(texts) == (
        f"teacher tokenizer differs: aligning on text, {100 * share:.0f}% of chunks are single tokens on the "
        "prompts' text (aligned path; per step in metrics.jsonl)")
    rollouts = batch(tokenizer, canonical(tokenizer), conversations())
    with pytest.raises(OpdError, match="^kl=full and kl=topk need the teacher's distribution over the student's "
                       "vocabulary; this teacher's tokenizer differs: use kl=sampled$"):
        aligned.score(rollouts, conversations(), hidden=True)
    with pytest.raises(OpdError, match=r"^teacher_template='mine' must be one of auto, own, student$"):
        choose_path(tokenizer, tokenizer, "mine")


def test_tokenizer_differences_name_what_differs(tokenizer, other_tokenizer):
    from opd.teachers.view import tokenizer_differences
    from opd.zoo import build_tokenizer

    assert tokenizer_differences(tokenizer, copy.deepcopy(tokenizer)) == []
    mine, theirs = tokenizer.get_vocab(), other_tokenizer.get_vocab()
    only_mine, only_theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    moved = sorted(t for t in set(mine) & set(theirs) if mine[t] != theirs[t])
    assert tokenizer_differences(tokenizer, other_tokenizer) == [
        f"{len(only_mine)} tokens only in the student, e.g. {only_mine[:5]}",
        f"{len(only_theirs)} tokens only in the teacher, e.g. {only_theirs[:5]}",
        f"{len(moved)} tokens with different ids, e.g. {moved[0]!r}: student {mine[moved[0]]}, teacher "
        f"{theirs[moved[0]]}",
        "EOS differs: student '<|im_end|>', teacher '<end_of_turn>'"]
    same_specials = build_tokenizer(seed=5, vocab_size=280, operators=2, corpus_lines=200)
    assert same_specials.eos_token_id == tokenizer.eos_token_id  # the same EOS, other merges: still another
    assert tokenizer_differences(tokenizer, same_specials)


def test_the_teacher_reads_its_own_eos_and_no_bos_after_the_student_text(cross_dirs, tokenizer, other_tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos_tokenizer = copy.deepcopy(other_tokenizer)  # a teacher tokenizer that adds a BOS, as Llama's does
    bos = bos_tokenizer.convert_tokens_to_ids("<start_of_turn>")
    bos_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<start_of_turn> $A", special_tokens=[("<start_of_turn>", bos)])
    view = TeacherView(None, tokenizer, bos_tokenizer)
    text = "= 12\nAnswer: 12"
    ids, alignment = view.translate(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    assert ids == other_tokenizer.encode(text, add_special_tokens=False) + [other_tokenizer.eos_token_id]
    assert alignment.student[-1] == alignment.teacher[-1] == alignment.count - 1  # the EOS pair, a chunk
    truncated, _ = view.translate(tokenizer.encode(text, add_special_tokens=False))
    assert truncated == ids[:-1]


def test_the_student_rendering_on_the_aligned_path_is_the_student_template_in_teacher_tokens(tokenizer,
                                                                                              other_tokenizer):
    messages = [{"role": "user", "content": "Compute 1+2"}]
    own = TeacherView(None, tokenizer, other_tokenizer).teacher_prompt(messages)
    assert own == chat_prompt_ids(other_tokenizer, messages)
    theirs = TeacherView(None, tokenizer, other_tokenizer, template="student").teacher_prompt(messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert theirs == other_tokenizer.encode(rendered, add_special_tokens=False) != own
    with_bos = copy.deepcopy(other_tokenizer)  # a teacher tokenizer that adds a BOS: not inside a rendered chat
    from tokenizers.processors import TemplateProcessing

    bos = with_bos.convert_tokens_to_ids("<start_of_turn>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<start_of_turn> $A",
                                                                   special_tokens=[("<start_of_turn>", bos)])
    assert TeacherView(None, tokenizer, with_bos, template="student").teacher_prompt(messages) == theirs
    base = copy.deepcopy(tokenizer)
    base.chat_template = None  # a base student: the plain text of the last message, with special tokens
    assert TeacherView(None, base, other_tokenizer, template="student").teacher_prompt(messages) == \
        other_tokenizer.encode("Compute 1+2", add_special_tokens=True)


def test_the_run_reads_the_teacher_template_and_keeps_the_exact_kl(own_template_dir, model_dirs, tmp_path):
    dirs = {**model_dirs, "teacher": own_template_dir}
    session = open_session(load_config(None, tiny_train_overrides(dirs, tmp_path / "a", kl="full")))
    assert session.teacher_view.path == "own"
    session = open_session(load_config(None, tiny_train_overrides(dirs, tmp_path / "b", teacher_template="student")))
    assert session.teacher_view.path == "shared"


def test_a_short_cross_tokenizer_run_lowers_the_chunk_level_kl(cross_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    config = load_config(None, tiny_train_overrides(cross_dirs, out, steps=12, eval_every=12, prompts_per_step=8,
                                                    samples_per_prompt=4, lr=3e-2))
    summary = train(config, progress=True)
    assert "opd: teacher tokenizer differs: aligning on text, " in capsys.readouterr().err
    records = read_jsonl(out / "metrics.jsonl")[1:]
    first_kl = sum(r["teacher_kl"] for r in records[:3]) / 3
    last_kl = sum(r["teacher_kl"] for r in records[-3:]) / 3
    assert last_kl < 0.8 * first_kl
    assert summary["teacher_kl_after"] < summary["teacher_kl_before"]
    assert all(0 < r["single_token_chunk_share"] < 1 and r["aligned_chunks"] > 0 for r in records)
    assert all(r["teacher_completion_tokens"] != r["completion_tokens"] for r in records[:3])


def test_what_needs_one_vocabulary_is_refused_before_any_compute(cross_dirs, tmp_path):
    with pytest.raises(OpdError, match=r"tokenizers of the student .* differ \(.*EOS differs.*use kl=sampled"):
        train(load_config(None, tiny_train_overrides(cross_dirs, tmp_path / "run", kl="full")), progress=False)
    with pytest.raises(OpdError, match="method=sft trains on the teacher's sampled token ids"):
        train(load_config(None, tiny_train_overrides(cross_dirs, tmp_path / "run", method="sft")), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_served_teacher_with_another_tokenizer_scores_as_in_process(cross_dirs, tokenizer, other_tokenizer, tmp_path):
    messages = conversations()
    rollouts = batch(tokenizer, canonical(tokenizer), messages)
    local = TeacherView(LocalTeacher(load_model(cross_dirs["teacher"], CPU, torch.float32), len(other_tokenizer)),
                        tokenizer, other_tokenizer).score(rollouts, messages)
    with LiveServer(cross_dirs["teacher"]) as server, RemoteTeacher(server.url, model="teacher") as remote:
        with pytest.raises(OpdError, match="give it as teacher_tokenizer=DIR"):
            remote.connect(tokenizer, 10)
        with pytest.raises(OpdError, match=r"differs from the teacher_tokenizer's: a probe text .* here\. "
                           r"teacher_tokenizer= must be the served model's tokenizer\.$"):
            remote.connect(tokenizer, 10, "teacher_tokenizer")
        remote.connect(other_tokenizer, 10, "teacher_tokenizer")
        served = TeacherView(remote, tokenizer, other_tokenizer).score(rollouts, messages)
        overrides = tiny_train_overrides(cross_dirs, tmp_path / "run", teacher=server.url, steps=2,
                                         teacher_tokenizer=cross_dirs["teacher"])
        summary = train(load_config(None, overrides), progress=False)
        assert summary["steps"] == 2 and summary["teacher_kl_after"] is not None
        assert torch.equal(served.chunks, local.chunks)
        # each row's shares telescope to the teacher's log-prob of its reading, whatever the covers
        torch.testing.assert_close(served.logprobs.sum(-1), local.logprobs.sum(-1), rtol=0, atol=1e-4)
        # an event's mass read from the server is its mass among the top 20 there and the token read
        view = TeacherView(remote, tokenizer, other_tokenizer)
        completions = rollouts.completion_ids()
        translated = [view.translate(ids) for ids in completions]
        wanted = view.wanted_events(completions, translated)
        prompts = [view.teacher_prompt(m) for m in messages]
        sequences = [p + ids for p, (ids, _) in zip(prompts, translated, strict=True)]
        covers = view.served_covers(wanted, sequences, [len(p) for p in prompts])
    model = load_model(cross_dirs["teacher"], CPU, torch.float32).eval()
    assert len(covers) > 10
    for (row, k), value in covers.items():
        j, event = wanted[row][k]
        at = len(prompts[row]) + j  # the position of teacher token j in its sequence
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=torch.tensor([sequences[row][:at]])).last_hidden_state[0, -1:]
            logprobs = head_logprobs(model.get_output_embeddings(), hidden, len(other_tokenizer))[0]
        seen = set(logprobs.topk(20).indices.tolist()) | {sequences[row][at]}
        want = torch.logsumexp(logprobs[[v for v in event if v in seen]], 0)
        assert abs(value - float(want)) < 1e-5



def test_the_teacher_flops_count_the_tokens_it_read(model_dirs, cross_dirs):
    from opd.flops import ModelShape, StepKind, step_flops

    student = ModelShape.of(load_model(model_dirs["student"], CPU, torch.float32))
    teacher = ModelShape.of(load_model(cross_dirs["teacher"], CPU, torch.float32))
    mine = step_flops(student, teacher, [10, 10], [5, 7], StepKind.DISTIL, group=2)
    theirs = step_flops(student, teacher, [10, 10], [5, 7], StepKind.DISTIL, group=2,
                        teacher_lengths=([14, 14], [3, 4]))
    alone = step_flops(student, teacher, [14, 14], [3, 4], StepKind.DISTIL, group=2)
    assert theirs["student_flops"] == mine["student_flops"]
    assert theirs["teacher_flops"] == alone["teacher_flops"] != mine["teacher_flops"]


def test_the_zoo_second_family_differs_in_every_way_the_issue_names(tokenizer, other_tokenizer):
    assert len(other_tokenizer) != len(tokenizer)
    assert other_tokenizer.eos_token == "<end_of_turn>" and other_tokenizer.chat_template != tokenizer.chat_template
    assert any(t.isdigit() and len(t) > 1 for t in other_tokenizer.get_vocab())  # numbers BPE merged
    assert not any(t.isdigit() and len(t) > 1 for t in tokenizer.get_vocab())  # one token per digit
    model = make_model(other_tokenizer, layers=1, width=16, seed=0)
    assert model.config.vocab_size == len(other_tokenizer)


def test_sft_has_a_teacher_with_its_own_template_write_from_its_own_rendering(own_template_dir, model_dirs, tmp_path,
                                                                            monkeypatch):
    import opd.samplers.local

    real, asked = opd.samplers.local.sample, []

    def recording(model, prompts, **kwargs):
        asked.append(prompts)
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(opd.samplers.local, "sample", recording)
    dirs = {**model_dirs, "teacher": own_template_dir}
    session = open_session(load_config(None, tiny_train_overrides(dirs, tmp_path / "run", method="sft")))
    rollouts = session.source.rollouts(0)
    theirs = load_tokenizer(own_template_dir)
    assert all("You are a careful teacher." in theirs.decode(p) for p in asked[0])  # the teacher read its own
    examples = session.task.train_examples(0, 4, session.config.seed)
    mine = [session.prompt_ids(ex.messages) for ex in examples for _ in range(2)]
    for row, prompt in enumerate(mine):  # the student trains after its own rendering
        width = int((rollouts.completion_mask[row] > 0).nonzero()[0])
        kept = rollouts.attention_mask[row, :width] > 0
        assert rollouts.tokens[row, :width][kept].tolist() == prompt
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

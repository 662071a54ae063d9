"""The Q-Former on tiny configs: shapes, masks, MiniLM init mapping, the stage-1 losses, stage 2, save/load."""

from __future__ import annotations

import random

import pytest
import torch

from engine.ask import prompting
from engine.models.qformer import EncoderMemory, QFormer, QFormerConfig, bert_init_state, build_qformer
from training.qformer_losses import Stage1Batch, itc_loss, stage1_losses

from _ask import TINY_BERT

TINY = dict(
    **TINY_BERT,
    vocab_size=120,
    cross_attention_frequency=1,
    encoder_hidden_size=24,
    num_query_tokens=6,
    embed_dim=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    max_position_embeddings=40,
)


class CharTokenizer:
    """A tokenizer stand-in for the tiny vocabulary: one id per character."""

    cls_token_id, sep_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts, add_special_tokens=True, padding=False, truncation=False, max_length=None, return_tensors=None):
        single = isinstance(texts, str)
        rows = [[3 + (ord(c) % 100) for c in t] for t in ([texts] if single else texts)]
        if add_special_tokens:
            rows = [[1] + r + [2] for r in rows]
        if single:
            return {"input_ids": rows[0]}
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def tiny(**over) -> QFormer:
    torch.manual_seed(0)
    return build_qformer(QFormerConfig(**{**TINY, **over}), text_state={})


def memory_of(model: QFormer, tokens: torch.Tensor, grid=(1, 2, 2)) -> EncoderMemory:
    return model.encoder_memory(model.prepare_encoder(tokens, grid))


def test_query_and_cross_attention_shapes():
    model = tiny().eval()
    tokens = torch.randn(3, 4, 24)
    states, weights = model.query_output(memory_of(model, tokens), keep_weights=True)
    assert states.shape == (3, 6, 32)
    assert len(weights) == 2  # cross_attention_frequency=1: every layer reads the image
    assert weights[0].shape == (3, 4, 6, 4)  # [B, heads, queries, tokens]
    assert torch.allclose(weights[0].sum(-1), torch.ones(3, 4, 6), atol=1e-5)
    assert tiny(cross_attention_frequency=2).layer[1].has_cross_attention is False
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    memory = memory_of(model, tokens)
    assert model.itm_logits(memory, None, ids, mask).shape == (3, 2)
    assert model.lm_logits(memory, None, ids, mask).shape == (3, 7, 120)
    assert model.text_embeddings(ids, mask).shape == (3, 16)
    assert model.similarity(model.image_embeddings(states), model.text_embeddings(ids, mask)).shape == (3, 3)


def test_token_mask_hides_padding_from_the_queries():
    model = tiny().eval()
    tokens = torch.randn(1, 4, 24)
    mask = torch.tensor([[True, True, False, False]])
    _, weights = model.query_output(memory_of(model, tokens, None), mask, keep_weights=True)
    assert float(weights[0][..., 2:].detach().abs().max()) == 0.0
    padded = torch.cat([tokens[:, :2], torch.randn(1, 2, 24) * 50], dim=1)
    a, _ = model.query_output(memory_of(model, tokens, None), mask)
    b, _ = model.query_output(memory_of(model, padded, None), mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_decoder_is_causal_and_reads_the_image():
    model = tiny().eval()
    memory = memory_of(model, torch.randn(1, 4, 24))
    ids = torch.randint(3, 100, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 7) % 100 + 3
    a, b = model.lm_logits(memory, None, ids, mask), model.lm_logits(memory, None, changed, mask)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5)  # earlier positions never see later tokens
    assert not torch.allclose(a[0, 5:], b[0, 5:])
    other = memory_of(model, torch.randn(1, 4, 24))
    assert not torch.allclose(model.lm_logits(other, None, ids, mask), a)  # and the image matters


def test_bert_init_maps_every_layer_and_copies_the_text_ffn_to_the_queries():
    cfg = QFormerConfig(**TINY)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**TINY_BERT, vocab_size=120, max_position_embeddings=40))
    state = bert_init_state(bert.state_dict(), cfg)
    model = build_qformer(cfg, text_state=bert.state_dict())
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.layer[1].intermediate_query.dense.weight, bert.encoder.layer[1].intermediate.dense.weight)
    assert not model.embeddings.word_embeddings.weight.requires_grad  # frozen: comes from the package
    assert all(not k.startswith("embeddings.word_embeddings") for k in model.trainable_state())
    with pytest.raises(KeyError):
        bert_init_state(bert.state_dict(), QFormerConfig(**{**TINY, "num_hidden_layers": 3}))


def _toy_batch(model: QFormer, tok: CharTokenizer, n: int = 8) -> Stage1Batch:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(n, 4, 24, generator=g)
    captions = ["ct liver" if i % 2 else "mri brain" for i in range(n)]
    ids, mask = prompting.text_batch(tok, captions)
    lm = prompting.lm_batch(tok, [prompting.qa_prompt("modality?")] * n, ["ct" if i % 2 else "mri" for i in range(n)])
    tokens[1::2] += 2.0  # the two classes differ in the image too
    return Stage1Batch(tokens, torch.ones(n, 4, dtype=torch.bool), (1, 2, 2), ids, mask, torch.tensor([i % 2 for i in range(n)]), lm)


def test_the_three_stage1_losses_decrease_on_a_toy_batch():
    model = tiny().train()
    tok = CharTokenizer()
    batch = _toy_batch(model, tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = {k: float(v) for k, v in stage1_losses(model, batch, gen).items()}
    for _ in range(40):
        losses = stage1_losses(model, batch, gen)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: float(v) for k, v in stage1_losses(model, batch, gen).items()}
    assert set(first) == {"itc", "itm", "itg"}
    # ITM's hard negatives are re-drawn each step, so it falls more slowly than the other two
    for k, factor in (("itc", 0.7), ("itg", 0.7), ("itm", 0.9)):
        assert last[k] < first[k] * factor, (k, first[k], last[k])


def _closed_toy(tok: CharTokenizer, n: int = 8):
    """Half the images say "ct", half "mri"; the question is the same, so only the image can tell."""
    from training.qformer_losses import ClosedBatch

    prompts, targets, owner, question = [], [], [], []
    for i in range(n):
        for cand in ("ct", "mri"):
            prompts.append(prompting.qa_prompt("modality?"))
            targets.append(cand)
            owner.append(i)
            question.append(i)
    answer = torch.tensor([0 if i % 2 else 1 for i in range(n)])
    return ClosedBatch(prompting.lm_batch(tok, prompts, targets), torch.tensor(owner), torch.tensor(question), answer)


def test_closed_loss_is_the_cross_entropy_over_candidate_likelihoods_and_learns_the_image():
    from training.qformer_losses import closed_loss

    model = tiny().train()
    tok = CharTokenizer()
    batch = _toy_batch(model, tok)
    closed = _closed_toy(tok)
    memory = model.encoder_memory(model.prepare_encoder(batch.tokens, batch.grid))
    loss = closed_loss(model, memory, batch.token_mask, closed)
    ll = model.answer_log_likelihood(
        memory.select(closed.owner), batch.token_mask[closed.owner], closed.lm.ids, closed.lm.attention_mask, closed.lm.target_mask
    ).view(-1, 2)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ll, closed.answer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        memory = model.encoder_memory(model.prepare_encoder(batch.tokens, batch.grid))
        step = closed_loss(model, memory, batch.token_mask, closed)
        opt.zero_grad()
        step.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        memory = model.encoder_memory(model.prepare_encoder(batch.tokens, batch.grid))
        ll = model.answer_log_likelihood(
            memory.select(closed.owner), batch.token_mask[closed.owner], closed.lm.ids, closed.lm.attention_mask, closed.lm.target_mask
        ).view(-1, 2)
        last = closed_loss(model, memory, batch.token_mask, closed)
    assert float(last) < 0.5 * float(loss)
    assert torch.equal(ll.argmax(1), closed.answer)  # each image's own answer ranks first: read from the image, not a prior


def test_itc_counts_identical_captions_as_positives():
    sim = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    same = itc_loss(sim, torch.tensor([0, 0, 1]))
    distinct = itc_loss(sim, torch.tensor([0, 1, 2]))
    assert float(same) < float(distinct)  # as distinct captions, rows 0/1 would be wrongly penalised


def test_decoder_vocabulary_restricts_writing_and_scoring():
    model = tiny(decoder_vocab=[2, 10, 11, 12]).eval()
    memory = memory_of(model, torch.randn(1, 4, 24))
    ids = torch.tensor([[1, 10, 11, 2]])
    assert model.lm_logits(memory, None, ids, torch.ones_like(ids)).shape == (1, 4, 4)
    target = torch.tensor([[False, False, True, True]])
    assert torch.isfinite(model.answer_log_likelihood(memory, None, ids, torch.ones_like(ids), target)).all()
    bad = torch.tensor([[1, 10, 50, 2]])
    assert model.answer_log_likelihood(memory, None, bad, torch.ones_like(bad), target).item() == float("-inf")
    with pytest.raises(ValueError):
        model.lm_targets(bad, target)


def test_stage2_projection_runs_with_a_tiny_causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.models.qformer_lm import QFormerToLM, freeze_lm

    lm = freeze_lm(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=2, n_positions=64)))
    bridge = QFormerToLM(tiny(), lm)
    memory = memory_of(bridge.qformer, torch.randn(2, 4, 24))
    ids = torch.randint(0, 50, (2, 9))
    target = torch.zeros(2, 9, dtype=torch.bool)
    target[:, 6:] = True
    loss = bridge.loss(memory, ids, torch.ones_like(ids), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert bridge.projection.weight.grad is not None and bridge.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())  # the LM stays frozen
    assert bridge.soft_prompt(memory).shape == (2, 6, 24)
    assert len(bridge.generate(memory.select(torch.tensor([0])), ids[:1, :4], max_new_tokens=3)) == 3


def test_lm_batch_marks_only_the_answer_and_keeps_it_when_the_question_is_long():
    tok = CharTokenizer()
    batch = prompting.lm_batch(tok, [prompting.qa_prompt("x" * 200)], ["yes"], max_tokens=32)
    flags = batch.target_mask[0][batch.attention_mask[0].bool()]
    assert batch.ids.shape[1] <= 32
    assert flags.tolist()[-4:] == [True] * 4 and flags.sum() == 4  # "yes" + [SEP]
    random.seed(0)


def test_cached_greedy_decoding_equals_the_full_recomputation():
    model = tiny(decoder_vocab=list(range(2, 60))).eval()
    memory = memory_of(model, torch.randn(1, 4, 24))
    prompt = [1, 10, 11, 12]
    query_kv: list = []
    model.query_output(memory, self_kv=query_kv)
    fast, fast_logps = model.greedy_decode(query_kv, prompt, max_new_tokens=6, stop_id=2)
    ids, slow, slow_logps = list(prompt), [], []
    for _ in range(7):
        t = torch.tensor([ids])
        logp = model.lm_logits(memory, None, t, torch.ones_like(t))[0, -1].log_softmax(-1)
        token = int(model.decoder_ids[int(logp.argmax())])
        slow_logps.append(float(logp.max()))
        if token == 2 or len(slow) >= 6:
            break
        slow.append(token)
        ids.append(token)
    assert fast == slow
    assert torch.allclose(torch.tensor(fast_logps), torch.tensor(slow_logps), atol=1e-4)


@pytest.mark.parametrize("cross_every", [1, 2])
def test_candidates_scored_from_the_query_pass_match_the_joint_pass(cross_every):
    """The queries never read the text in the causal view: scoring candidates from their cached keys/values gives the joint pass's numbers."""
    model = tiny(cross_attention_frequency=cross_every).eval()
    tok = CharTokenizer()
    memory = memory_of(model, torch.randn(1, 4, 24))
    mask = torch.tensor([[True, True, True, False]])  # one padded encoder token
    candidates = ["yes", "no", "maybe not"]  # different lengths: padded text rows
    batch = prompting.lm_batch(tok, ["is it? "] * len(candidates), candidates)
    with torch.inference_mode():
        kv: list = []
        states, _ = model.query_output(memory, mask, self_kv=kv)
        assert len(kv) == len(model.layer) and kv[0].key.shape[2] == TINY["num_query_tokens"]
        joint = model.answer_log_likelihood(
            memory.repeat(len(candidates)), mask.expand(len(candidates), -1), batch.ids, batch.attention_mask, batch.target_mask
        )
        cached = model.answer_log_likelihood(None, None, batch.ids, batch.attention_mask, batch.target_mask, query_kv=kv)
    torch.testing.assert_close(cached, joint, rtol=1e-5, atol=1e-5)
    assert len(set(joint.tolist())) == len(candidates)  # the candidates differ, so equal numbers are not a coincidence

"""Ask a scan: the Q-Former answering questions, scoring labels and re-ranking texts for one scan.

Design decisions
- A scan is encoded once (frozen encoder -> tokens -> the Q-Former's
  cross-attention keys/values and query outputs) and kept in a small LRU
  keyed by the scan's content hash (pixels + geometry), never by file
  name: two files with the same pixels share an encoding, two different
  scans never do, and no path or identifier is held.
- Volumes go through the 3D I3ResNet at the config's fixed spacing and
  size; 2D images through its deflated 2D kernels (the same network read
  as a depth-constant one-slice volume). A checkpoint trained on volumes
  only says so (`supports_2d: false`) and a 2D image then gets a clear
  error instead of a guess.
- Closed questions (those `questions.match_question` recognises: yes/no,
  modality, region, plane, side, ...) are answered by ranking their
  candidate answers with the decoder's likelihood; every candidate's
  probability is returned. Other questions get a greedy answer from the
  decoder, with the mean token probability as its confidence.
- Evidence is the cross-attention of the 32 queries over the encoder's
  token grid (mean over queries, heads and cross-attention layers), mapped
  back to the scan's voxels through the preprocessing's mapping.
- Trust (issue 14): closed answers carry the checkpoint's calibrated
  probabilities (temperature per question family, `trust.closed`, applied
  to the candidates' scores) when it has them, and a verdict: the answer,
  or "uncertain" when its top probability is low (Calibration.
  choice_uncertain); generated answers are never called calibrated. Each
  scan gets an out-of-distribution flag (`assess`): the kNN distance of its
  `trust_embedding` (the queries' mean output, `ood_embedding`: the space
  training fits the reference set in) to the
  checkpoint's reference set, and the model's own modality answer against
  the DICOM header's. Both are cached with the scan's encoding.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from engine.ask import prompting
from engine.ask.questions import QuestionError, match_question, suggested_questions, validate_question
from engine.errors import MedLensError, ModelError
from engine.models.preprocess import IDENTITY_MEAN, IDENTITY_STD, ImagePreprocess
from engine.models.qformer import EncoderMemory, QFormer, QFormerConfig, build_qformer, text_encoder_dir
from engine.scan import Scan
from engine.trust import UNCERTAIN, OodFlag
from engine.trust.model import ModelTrust

FORMAT = "medlens-qformer/1"
REGION_QUESTION = "What body region is shown?"
MODALITY_QUESTION = "What is the imaging modality?"
GENERATED_NOTE = "generated answer: its confidence is the mean probability of its words, not a calibrated probability"
CACHE_SIZE = 8  # encoded scans kept per process (a few MB each)
MAX_ANSWER_TOKENS = 24


class AskError(MedLensError):
    """A question cannot be asked of this scan with this model; the message says why."""


@dataclass
class Evidence:
    grid_weights: np.ndarray  # attention over the encoder's token grid (gz, gx, gy) or (1, gy, gx) for 2D, sums to 1
    slice_weights: np.ndarray | None  # per axial slice of the scan (z), sums to 1; None for 2D
    volume_map: np.ndarray  # the same attention on the scan's own grid: (z, y, x) or (y, x), max 1


@dataclass
class Answer:
    question: str
    answer: str
    confidence: float  # the model's own probability of `answer` (closed: softmax of candidate scores; open: mean token probability)
    closed: bool
    family: str | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)  # closed: every candidate, ranked by raw probability
    evidence: Evidence | None = None
    calibrated: dict[str, float] | None = None  # closed, calibrated model: candidate -> calibrated probability
    uncertain: bool | None = None  # closed: the top answer is not sure enough (None for generated answers)
    ood: OodFlag | None = None  # the scan is unlike the model's training data (set by AskModel.ask / assess)
    trust_note: str = ""  # "not calibrated: ..." or what the calibration was fitted on

    @property
    def calibrated_confidence(self) -> float | None:
        return None if self.calibrated is None else float(self.calibrated.get(self.answer, 0.0))

    @property
    def verdict(self) -> str:
        """The answer, or "uncertain" (closed questions whose top answer is not sure enough)."""
        return UNCERTAIN if self.uncertain else self.answer

    def to_dict(self) -> dict[str, Any]:
        cal = self.calibrated or {}
        return {
            "question": self.question,
            "answer": self.answer,
            "confidence": round(float(self.confidence), 4),
            "closed": self.closed,
            "family": self.family,
            "candidates": [
                {
                    "answer": a,
                    "probability": round(float(p), 4),
                    **({"calibrated_probability": round(float(cal[a]), 4)} if a in cal else {}),
                }
                for a, p in self.candidates
            ],
            "calibrated_confidence": None if self.calibrated_confidence is None else round(self.calibrated_confidence, 4),
            "verdict": self.verdict,
            "uncertain": self.uncertain,
            "trust": self.trust_note,
            **(self.ood.to_dict() if self.ood is not None else OodFlag.unknown().to_dict()),
        }


@dataclass
class Encoded:
    memory: EncoderMemory
    token_mask: torch.Tensor  # [1, N]
    grid: tuple[int, int, int]
    query_states: torch.Tensor  # [1, Q, H]
    cross_weights: torch.Tensor  # [N] mean cross-attention of the queries over tokens
    mapping: Any  # volume_prep mapping (token grid -> scan voxels)
    is_2d: bool
    scan_shape: tuple[int, ...]
    memo: dict[str, Any] = field(default_factory=dict)  # per-scan answers the engine reuses (OOD flag, region, modality)
    query_kv: list = field(default_factory=list)  # the queries' self-attention keys/values per layer: candidates are scored from them


OOD_EMBEDDING = "mean_query_output"  # what a Q-Former's trust_reference.safetensors holds (config trust.ood.embedding)


def ood_embedding(enc: Encoded) -> np.ndarray:
    """The vector a Q-Former's out-of-distribution reference set holds for one scan: its query outputs
    averaged over the queries, float32 [hidden] (ReferenceSet normalises). Every encoding computes the
    query outputs anyway, so flagging a scan costs no extra pass; training builds the reference set with
    this same function (training/qformer_trust.py)."""
    return enc.query_states[0].float().mean(dim=0).numpy().astype(np.float32)


def qformer_preprocess(config: dict[str, Any]) -> ImagePreprocess:
    """A Q-Former checkpoint's 2D preprocessing: the engine's model image resized to `image_size`, in 0..1
    (the frozen Astra encoder takes unstandardised pixels). Training's token cache uses the same object."""
    return ImagePreprocess.from_config(
        config.get("preprocess_cfg"), size=int(config.get("image_size", 128)), mean=IDENTITY_MEAN, std=IDENTITY_STD
    )


class Tokens(NamedTuple):
    """A frozen encoder's output: tokens [B, N, C] (fp32) and their grid (Z', X', Y'); 2D images have Z' = 1."""

    tokens: torch.Tensor
    grid: tuple[int, int, int]


class EncoderTokens(NamedTuple):
    """One scan's frozen-encoder tokens [1, N, C], their grid, and the voxel mapping of its preprocessing."""

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    mapping: Any  # volume_prep mapping (token grid -> scan voxels)


class Generated(NamedTuple):
    text: str
    confidence: float  # mean probability of the generated tokens


class FrozenEncoders:
    """The frozen image encoders a Q-Former checkpoint names in its config.

    "i3resnet152": the Astra CT encoder (3D) and its deflated 2D kernels, weights from
    their package, each on the CPU path engine.models.encoder_path chose for this machine
    (probed once, on first use, with a bundled MR volume / CT slice; cached on disk).
    "i3resnet-tiny": a small random-weight I3ResNet (seeded) for tests and smoke runs;
    a 2D image goes through it as a one-slice volume."""

    def __init__(self, spec: dict[str, Any] | None, prep: Any = None, preprocess: ImagePreprocess | None = None):
        spec = dict(spec or {"type": "i3resnet152"})
        self.kind = spec.get("type", "i3resnet152")
        self._tiny = None
        self._prep, self._preprocess = prep, preprocess or qformer_preprocess({})
        self._fast: dict[str, Any] = {}
        if self.kind == "i3resnet-tiny":
            from engine.models.i3resnet import I3ResNet

            generator_state = torch.random.get_rng_state()
            torch.manual_seed(int(spec.get("seed", 0)))
            widths = tuple(spec.get("widths", (4, 8, 8, 8)))
            self._tiny = I3ResNet(layers=(1, 1, 1, 1), widths=widths, stem_width=widths[0]).eval()
            for p in self._tiny.parameters():
                p.requires_grad_(False)
            torch.random.set_rng_state(generator_state)
        elif self.kind != "i3resnet152":
            raise ModelError(f"unknown frozen encoder type {self.kind!r} (known: i3resnet152, i3resnet-tiny)")

    def encoder(self, dims: int):
        """The Astra encoder for volumes (dims=3) or images (dims=2) on its chosen path (a FastEncoder)."""
        key = f"{dims}d"
        if key not in self._fast:
            from engine.models import astra, calibration, i3resnet
            from engine.models.encoder_path import fast_encoder

            revision = astra.revision()
            if dims == 3:
                from engine.models.volume_prep import VolumePrep

                prep = self._prep or VolumePrep()
                self._fast[key] = fast_encoder(
                    f"astra-i3resnet152-3d@{revision}",
                    "Q-Former 3D encoder",
                    i3resnet.load_astra_i3resnet,
                    lambda: calibration.example_volume(prep),
                    dynamic_axes=(0, 2, 3, 4),
                )
            else:
                self._fast[key] = fast_encoder(
                    f"astra-resnet152-deflated-2d@{revision}",
                    "Q-Former 2D encoder",
                    i3resnet.load_astra_deflated_2d,
                    lambda: self._preprocess([calibration.example_image()]),
                    forward="forward_features",
                    dynamic_axes=(0, 2, 3),
                )
        return self._fast[key]

    def path_label(self, is_2d: bool) -> str:
        """Which path encodes a scan, in words ("OpenVINO bf16"); "fp32" for the tiny test encoder."""
        return "fp32" if self._tiny is not None else self.encoder(2 if is_2d else 3).path.label

    @torch.inference_mode()
    def volume_tokens(self, volume: torch.Tensor) -> Tokens:
        from engine.models import i3resnet

        if self._tiny is not None:
            return Tokens(*i3resnet.encode_volume_tokens(volume, self._tiny))
        tokens, grid = i3resnet.feature_tokens(self.encoder(3)(volume))
        return Tokens(tokens.float(), grid)

    @torch.inference_mode()
    def image_tokens(self, image: torch.Tensor) -> Tokens:
        from engine.models import i3resnet

        if self._tiny is not None:
            tokens, grid = self._tiny.tokens(image.mean(dim=1, keepdim=True)[..., None])
            return Tokens(tokens.float(), grid)
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"expected an image [B, 3, H, W], got shape {tuple(image.shape)}")
        tokens, (h, w) = i3resnet.feature_tokens(self.encoder(2)(image.expand(-1, 3, -1, -1)))
        return Tokens(tokens.float(), (1, h, w))


class AskModel:
    def __init__(
        self, qformer: QFormer, config: dict[str, Any], tokenizer, *, name: str, revision: str = "", trust: ModelTrust | None = None
    ):
        self.qformer = qformer.eval()
        self.trust = trust or ModelTrust.none()
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.supports_2d = bool(config.get("supports_2d", True))
        from engine.models.volume_prep import VolumePrep

        self.prep = VolumePrep.from_dict(config.get("volume_prep", {}))
        self.preprocess = qformer_preprocess(config)
        self.image_size = self.preprocess.size
        self.encoders = FrozenEncoders(config.get("encoder"), self.prep, self.preprocess)
        self._cache: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}

    # ----------------------------------------------------------------- encoding
    def encoder_tokens(self, scan: Scan) -> EncoderTokens:
        """Frozen encoder tokens [1, N, C], their grid and the voxel mapping for one scan."""
        from engine.models import volume_prep

        if scan.is_2d:
            if not self.supports_2d:
                raise AskError(f"the model '{self.name}' answers questions about 3D volumes only; this is a 2D image")
            from engine.zeroshot.imaging import MODEL_IMAGE_SIZE, model_image

            prepared = volume_prep.prepare_image(scan, self.image_size)  # its mapping; pixels as in training:
            tokens, grid = self.encoders.image_tokens(self.preprocess([model_image(scan, size=MODEL_IMAGE_SIZE).pixels]))
        else:
            prepared = volume_prep.prepare_volume(scan.volume(0), self.prep)
            tokens, grid = self.encoders.volume_tokens(prepared.tensor)
        return EncoderTokens(tokens, tuple(int(g) for g in grid), prepared.mapping)

    def encode(self, scan: Scan) -> Encoded:
        key = scan.content_hash
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tokens, grid, mapping = self.encoder_tokens(scan)
        encoded = self.encode_tokens(tokens, grid, mapping, scan.is_2d, tuple(scan.volume_shape))
        with self._lock:
            self._cache[key] = encoded
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return encoded

    def encode_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int, int], mapping: Any = None, is_2d: bool = False, scan_shape: tuple[int, ...] = ()
    ) -> Encoded:
        """Frozen-encoder tokens [1, N, C] -> the Q-Former's view of them (evaluation feeds cached tokens here)."""
        with torch.inference_mode():
            memory = self.qformer.encoder_memory(self.qformer.prepare_encoder(tokens.float(), grid))
            mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
            query_kv: list = []
            out = self.qformer.query_output(memory, mask, keep_weights=True, self_kv=query_kv)
            weights = out.cross_weights
            cross = (
                torch.stack([w.mean(dim=(1, 2)) for w in weights]).mean(0)[0]
                if weights
                else torch.full((tokens.shape[1],), 1 / tokens.shape[1])
            )
        return Encoded(memory, mask, grid, out.states, cross, mapping, is_2d, scan_shape, query_kv=query_kv)

    # ----------------------------------------------------------------- answers
    def _candidate_scores(self, enc: Encoded, prompt: str, candidates: list[str]) -> np.ndarray:
        batch = prompting.lm_batch(self.tokenizer, [prompt] * len(candidates), candidates)
        with torch.inference_mode():  # from the queries' cached keys/values: the encoder memory is not read again
            ll = self.qformer.answer_log_likelihood(
                None,
                None,
                batch.ids,
                batch.attention_mask,
                batch.target_mask,
                query_kv=enc.query_kv,
            )
        return ll.numpy()

    def _generate(self, enc: Encoded, prompt: str) -> Generated:
        decoded = self.qformer.greedy_decode(
            enc.query_kv, prompting.prompt_ids(self.tokenizer, prompt), MAX_ANSWER_TOKENS, self.tokenizer.sep_token_id
        )
        text = self.tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip()
        return Generated(text, float(np.exp(np.mean(decoded.log_probs))) if decoded.log_probs else 0.0)

    def ask(self, scan: Scan, question: str, *, with_evidence: bool = True, assess: bool = True) -> Answer:
        """Answer a question about `scan`; `assess`: attach the scan's out-of-distribution flag."""
        question = validate_question(question)
        enc = self.encode(scan)
        answer = self.answer_encoded(enc, question, scan.modality.value)
        if assess:
            answer.ood = self.assess(enc, scan)
        if with_evidence:
            answer.evidence = self.evidence(enc)
        return answer

    def answer_encoded(self, enc: Encoded, question: str, modality: str | None = None, candidates: list[str] | None = None) -> Answer:
        """Answer a (validated) question about an encoded scan; `candidates` overrides the family's."""
        match = match_question(question, modality)
        prompt = prompting.qa_prompt(question)
        if candidates is not None:
            from engine.ask.questions import QuestionMatch

            match = QuestionMatch(
                match.family if match else "given", dict(match.slots) if match else {}, tuple(candidates), True, "given", None
            )
        if match is not None and match.closed and match.candidates:
            candidates = list(match.candidates)
            return self._closed_answer(question, match.family, candidates, self._candidate_scores(enc, prompt, candidates))
        text, confidence = self._generate(enc, prompt)
        return Answer(question, text or "(no answer)", confidence, False, match.family if match else None, trust_note=GENERATED_NOTE)

    def _closed_answer(self, question: str, family: str, candidates: list[str], scores: np.ndarray) -> Answer:
        """Rank candidates by their scores; calibrated probabilities and the verdict from trust.closed."""
        probs = np.exp(scores - scores.max())
        probs = probs / probs.sum()
        order = np.argsort(-probs)
        ranked = [(candidates[i], float(probs[i])) for i in order]
        calibration = self.trust.closed
        calibrated = None
        top = ranked[0][1]
        if calibration.fitted:
            cal = calibration.get(family).choices(scores)
            calibrated = {candidates[i]: float(cal[i]) for i in order}
            top = calibrated[ranked[0][0]]
        return Answer(
            question,
            ranked[0][0],
            ranked[0][1],
            True,
            family,
            ranked,
            calibrated=calibrated,
            uncertain=calibration.choice_uncertain(top, len(candidates)),
            trust_note=self.trust.note,
        )

    # ----------------------------------------------------------------- trust
    def closed_probabilities(self, enc: Encoded, question: str) -> tuple[dict[str, float], bool]:
        """candidate -> probability (calibrated when the checkpoint is) for a closed question, and whether calibrated.
        Memoised on the encoding: the field-of-view and OOD checks ask the same questions of every scan."""
        key = "closed:" + question
        if key not in enc.memo:
            answer = self.answer_encoded(enc, question)
            enc.memo[key] = (dict(answer.calibrated or dict(answer.candidates)), answer.calibrated is not None)
        return enc.memo[key]

    def region_answer(self, enc: Encoded) -> tuple[dict[str, float], bool]:
        """The model's answer to "What body region is shown?": candidate region -> probability, calibrated?"""
        return self.closed_probabilities(enc, REGION_QUESTION)

    def modality_probabilities(self, enc: Encoded) -> dict[Any, float]:
        """Modality -> probability from the model's answer to "What is the imaging modality?"."""
        from engine.ask.questions import vocabulary
        from engine.zeroshot.prompts import MODALITY_KEYS

        by_key = {key: m for m, key in MODALITY_KEYS.items()}
        by_candidate = {candidate: by_key[key] for key, candidate in vocabulary().get("manifest_modality", {}).items() if key in by_key}
        probs, _ = self.closed_probabilities(enc, MODALITY_QUESTION)
        return {by_candidate[c]: p for c, p in probs.items() if c in by_candidate}

    def trust_embedding(self, enc: Encoded) -> np.ndarray:
        """(D,) float32: the scan in the space of the checkpoint's reference set, the one training fits it in
        (`ood_embedding`; config trust.ood.embedding records it as OOD_EMBEDDING)."""
        return ood_embedding(enc)

    def assess(self, enc: Encoded, scan: Scan) -> OodFlag:
        """The scan's out-of-distribution flag: reference-set distance and modality vs the DICOM header (memoised)."""
        if "ood" not in enc.memo:
            from engine.trust import modality

            header = modality.header_modality(scan)
            reasons, checks = [], []
            if header is not None:
                checks.append("header modality")
                reason = modality.conflict(self.modality_probabilities(enc), header, f"the model {self.name}")
                reasons += [reason] if reason else []
            reference = self.trust.reference
            enc.memo["ood"] = OodFlag.assess(reference, self.trust_embedding(enc) if reference is not None else None, reasons, checks)
        return enc.memo["ood"]

    def caption(self, scan: Scan) -> Answer:
        enc = self.encode(scan)
        text, confidence = self._generate(enc, prompting.CAPTION_PROMPT)
        return Answer("findings", text, confidence, False, "caption", evidence=self.evidence(enc))

    def suggested_questions(self, scan: Scan) -> list[str]:
        return suggested_questions(scan.modality.value, scan.metadata.get("BodyPartExamined"))

    # ----------------------------------------------------------------- labels and re-ranking
    def _text_embeddings(self, texts: list[str]) -> torch.Tensor:
        key = tuple(texts)
        if key not in self._label_cache:
            ids, mask = prompting.text_batch(self.tokenizer, texts)
            with torch.inference_mode():
                self._label_cache[key] = self.qformer.text_embeddings(ids, mask)
            if len(self._label_cache) > 32:
                self._label_cache.pop(next(iter(self._label_cache)))
        return self._label_cache[key]

    def label_texts(self, scan: Scan, labels: list[str]) -> list[str]:
        return self.label_texts_for(scan.modality.value, labels)

    def label_texts_for(self, modality: str, labels: list[str]) -> list[str]:
        """The caption-style text a label is scored as (the Q-Former was trained on findings captions)."""
        template = self.config.get("label_template", "{label}")
        return [template.format(label=label, modality=modality) for label in labels]

    def label(self, scan: Scan, labels: list[str]) -> list[dict[str, Any]]:
        """3D (or 2D) zero-shot labels: softmax of ITC similarities with the model's logit scale, ranked."""
        if not labels:
            raise AskError("give at least one label")
        enc = self.encode(scan)
        text = self._text_embeddings(self.label_texts(scan, labels))
        with torch.inference_mode():
            sims = self.qformer.similarity(self.qformer.image_embeddings(enc.query_states), text)[0]
            probs = (sims * self.qformer.logit_scale.exp()).softmax(-1)
        out = [{"label": label, "probability": float(p), "score": float(s)} for label, p, s in zip(labels, probs, sims)]
        return sorted(out, key=lambda d: -d["probability"])

    def match_probability(self, scan: Scan, texts: list[str]) -> np.ndarray:
        """Image-text matching probability per text (for re-ranking retrieval results)."""
        enc = self.encode(scan)
        ids, mask = prompting.text_batch(self.tokenizer, texts)
        with torch.inference_mode():
            logits = self.qformer.itm_logits(enc.memory.repeat(len(texts)), enc.token_mask.expand(len(texts), -1), ids, mask)
        return logits.softmax(-1)[:, 1].numpy()

    # ----------------------------------------------------------------- evidence
    def evidence(self, enc: Encoded) -> Evidence:
        grid_w = enc.cross_weights.reshape(enc.grid).numpy().astype(np.float32)
        grid_w = grid_w / max(float(grid_w.sum()), 1e-12)
        volume_map = np.asarray(enc.mapping.grid_to_scan(grid_w, enc.grid), dtype=np.float32)
        peak = float(volume_map.max())
        volume_map = volume_map / peak if peak > 0 else volume_map
        slices = None
        if not enc.is_2d:
            per_slice = volume_map.reshape(volume_map.shape[0], -1).mean(1)
            slices = per_slice / max(float(per_slice.sum()), 1e-12)
        return Evidence(grid_w, slices, volume_map.astype(np.float32))


# --------------------------------------------------------------------- save / load
def save_ask_model(model: QFormer, folder: str | Path, config: dict[str, Any], card: str = "", dtype: torch.dtype = torch.float16) -> Path:
    """config.json (format, qformer config, preprocessing, ...) + weights (trainable part, fp16, sharded) + MODEL_CARD.md."""
    from engine.models.weights import save_checkpoint_folder

    full = {"format": FORMAT, **config, "qformer": model.config.to_dict()}
    state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype) for k, v in model.trainable_state().items()}
    return save_checkpoint_folder(folder, full, state, card)


def is_ask_folder(folder: str | Path) -> bool:
    from engine.models.catalog import read_config

    return str((read_config(Path(folder)) or {}).get("format", "")) == FORMAT


def load_ask_folder(folder: str | Path, name: str | None = None) -> AskModel:
    from transformers import AutoTokenizer

    from engine.models import weights

    folder = Path(folder)
    if not is_ask_folder(folder):
        raise ModelError(f"{folder} is not a MedLens Q-Former checkpoint (config.json with format {FORMAT})")
    config = json.loads((folder / "config.json").read_text())
    cfg = QFormerConfig.from_dict(config["qformer"])
    model = build_qformer(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.read_weights(folder).items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not model.is_frozen(k)]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"Q-Former weights do not fit: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir(cfg.text_encoder))
    from engine.trust.model import load_trust

    return AskModel(
        model, config, tokenizer, name=name or f"local-dir:{folder}", revision=weights.revision(folder), trust=load_trust(config, folder)
    )


DEFAULT_ASK_MODEL = "medlens-qformer"


def ask_models() -> dict[str, Path]:
    """Shipped Q-Former checkpoints by name."""
    from engine.models import catalog

    return {name: entry.folder for name, entry in catalog.shipped(catalog.ASK).items()}


def load_ask_model(source: str | None = None) -> AskModel:
    """A shipped name or local-dir:/path; one model cached per process (engine.models.catalog)."""
    from engine.models import catalog

    return catalog.load(source, catalog.ASK)


__all__ = ["AskError", "AskModel", "Answer", "Evidence", "QuestionError", "load_ask_model", "save_ask_model", "ask_models", "is_ask_folder"]

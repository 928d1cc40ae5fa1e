"""The demo's model: a tiny Llama with a word-level tokenizer, pretrained on copying, and LoRA
adapters trained with PEFT on the synthetic tasks of pipeline.demo.tasks.

Pretraining on `copy` gives the base the attention structure the tasks share (find the words,
emit them, stop), so each LoRA adapter only has to learn its own twist in a few seconds on a CPU.
"""
import json
import os
import random
import warnings

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from pipeline.demo.tasks import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, VOCAB, examples

# peft calls a transformers method that transformers 5 deprecates; nothing for a demo user to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

MODEL_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
                    tie_word_embeddings=False)


def build_tokenizer() -> Tokenizer:
    """Word-level: one token per whitespace-separated word; `<s>` prepended to every encoding."""
    vocab = {word: i for i, word in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                             special_tokens=[(BOS, vocab[BOS])])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def build_base_model(tokenizer: Tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    ids = {token: tokenizer.token_to_id(token) for token in (PAD, BOS, EOS)}
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), pad_token_id=ids[PAD], bos_token_id=ids[BOS],
                         eos_token_id=ids[EOS], **MODEL_CONFIG)
    return LlamaForCausalLM(config)


def save_base_model(model: LlamaForCausalLM, tokenizer: Tokenizer, path: str) -> None:
    """A Hugging Face checkpoint directory: config, safetensors weights, tokenizer, generation config."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": PAD, "unk_token": UNK, "model_max_length": model.config.max_position_embeddings},
                  f, indent=2)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     pad_token_id=model.config.pad_token_id).save_pretrained(path)


def encode_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that score only the answer and its `</s>`."""
    pad_id = tokenizer.token_to_id(PAD)
    rows = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer.encode(prompt).ids
        answer_ids = tokenizer.encode(f"{answer} {EOS}", add_special_tokens=False).ids
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, (input_ids != pad_id).long(), labels


def train(model, tokenizer: Tokenizer, task: str, steps: int, *, lr: float, seed: int, batch_size: int = 64,
          desc: str | None = None) -> float:
    """Train on fresh examples of one task each step (AdamW, linear decay); returns the last loss."""
    torch.manual_seed(seed)
    pool = examples(task, 4096, seed=seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=desc or f"train {task}", unit="step", leave=False)
    for _ in bar:
        input_ids, attention_mask, labels = encode_batch(tokenizer, rng.sample(pool, batch_size))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def train_adapter(base: LlamaForCausalLM, tokenizer: Tokenizer, task: str, lora: LoraConfig, steps: int, *,
                  seed: int, path: str, lr: float = 1e-2) -> float:
    """LoRA-train a copy of the base on one task and save it as a PEFT directory; the base is left as it was."""
    torch.manual_seed(seed)
    model = get_peft_model(base, lora)
    try:
        loss = train(model, tokenizer, task, steps, lr=lr, seed=seed, desc=f"adapter {os.path.basename(path)}")
        model.save_pretrained(path, safe_serialization=True)
    finally:
        model.unload()  # take the LoRA layers out again so the next adapter starts from the plain base
    return loss

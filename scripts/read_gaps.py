"""Where does the OCR decoder read? Teacher-forced loss per text-token position, true image vs another page's.

A decoder that reads shows a gap (true < swapped) at every position; one that reads only the first token
(where the text starts is fixed) shows a gap at position 0 and none after. Diagnostic for issue 6.

    PYTHONPATH=. python scripts/read_gaps.py runs/ocr-tiny-grid3            # latest checkpoint of a run
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from optictx.tokenizer import Tokenizer
from optictx.train.checkpoint import latest_checkpoint
from optictx.train.ocr_run import build_model
from optictx.train.ocr_task import OCRTask, OCRTaskConfig, OCRTrainModule, ProbeSites, greedy_read


def per_position(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lab, lg = labels[:, 1:], logits[:, :-1]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none")
    return loss.view(lab.shape), lab != -100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a training run folder (recipe.json, tokenizer/, checkpoints/)")
    args = ap.parse_args()
    run = Path(args.run)
    recipe = json.loads((run / "recipe.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_pretrained(run / "tokenizer")
    _, model = build_model(recipe, tok)
    cfg = OCRTaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.get("ocr", {}).items()})
    net = OCRTrainModule(model, *ProbeSites.cells(cfg.page_size, cfg.grid))
    ckpt = latest_checkpoint(run / "checkpoints")
    net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    net.eval()
    task = OCRTask(tok, cfg)
    batch = task.collate(task.eval_pages())
    with torch.no_grad():
        true, mask = per_position(net(batch["pixels"], batch["input_ids"])[0], batch["labels"])
        swap, _ = per_position(net(batch["pixels"].roll(1, 0), batch["input_ids"])[0], batch["labels"])
    print(f"{ckpt}: text-token position, loss with the true image, with another page's image")
    for j in (0, 1, 2, 3, 5, 10, 20, 40, 80):
        rows = [(float(true[r, idx[j]]), float(swap[r, idx[j]])) for r in range(mask.shape[0])
                if len(idx := mask[r].nonzero().flatten()) > j]
        if rows:
            t, s = (sum(col) / len(rows) for col in zip(*rows))
            print(f"  {j:3d}: {t:5.2f} vs {s:5.2f}  (gap {s - t:+.2f}, {len(rows)} pages)")
    page = task.eval_pages()[0]
    print("truth:", repr(page.text[:120]))
    print("read :", repr(greedy_read(model, tok, page.image, cfg.grid, 60)))


if __name__ == "__main__":
    main()

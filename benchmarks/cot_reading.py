"""Where explicit CoT goes wrong on the embedded task: greedy CoT on the test puzzles, then, step by step, how often
the model reads the colour and the direction of the cell it names, and the first error of each rationale
(`vedas_trainer.synthetic.cot_step_reading`).

    python benchmarks/cot_reading.py RUN/checkpoint-1400 [--n_test 300] [--out reading.json]

Point it at the checkpoint saved at the end of the CoT warm-up (train.py's WarmupEvalCallback records the same
numbers in report.json under ``warmup_results.cot.step_reading``).
"""

import argparse
import json

from vedas_trainer.checkpoint import load_vedas
from vedas_trainer.evaluation import evaluate_checkpoint
from vedas_trainer.synthetic import build_synthetic_dataset, cot_step_reading


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n_test", type=int, default=300)
    parser.add_argument("--seed_data", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, processor = load_vedas(args.checkpoint)
    model.eval()
    test = build_synthetic_dataset(args.n_test, seed=args.seed_data, split="test")
    samples = [test[i] for i in range(len(test))]
    cot = evaluate_checkpoint(model, processor, samples, modes=("cot",), batch_size=32, grounding=False)["modes"]["cot"]
    reading = {"checkpoint": args.checkpoint, "cot_accuracy": cot["accuracy"],
               **cot_step_reading(samples, [record["prediction"] for record in cot["predictions"]])}
    print(json.dumps(reading, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(reading, f, indent=1)


if __name__ == "__main__":
    main()

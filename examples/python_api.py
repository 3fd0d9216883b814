"""The Python worked example: export a teacher and a student, inspect, plan and write the joint graph."""

# Command line:
#     python examples/python_api.py OUT_DIR                                  # exports torchvision models
#     python examples/python_api.py OUT_DIR --teacher T.onnx --student S.onnx   # kdgraph only, no torch
# Without --teacher/--student it exports torchvision's resnet34 (teacher) and resnet18 (student),
# 10 classes at 32x32, randomly initialised, with kdgraph.export_teacher / export_student (needs
# torch, torchvision, onnx). Then it prints the student's stages (kdgraph.inspect), the pairs that KD
# + AT would train (kdgraph.merge with dry_run=True), writes OUT_DIR/joint.onnx and its sidecar
# (kdgraph.merge), and prints the losses of tract's check run. Train the result with
#     python examples/train_ort.py OUT_DIR/joint.json

import argparse
import sys
from pathlib import Path

import kdgraph


def export_torchvision(out_dir: Path):
    """resnet34 -> teacher.onnx, resnet18 -> student.onnx (10 classes, 32x32, dynamic batch)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    teacher = kdgraph.export_teacher(torchvision.models.resnet34(num_classes=10), x, out_dir / "teacher.onnx")
    student = kdgraph.export_student(torchvision.models.resnet18(num_classes=10), x, out_dir / "student.onnx")
    return teacher, student


def show_stages(student: Path) -> None:
    found = kdgraph.inspect(student)
    print(f"student {student.name}: input {found['inputs'][0]['shape']}, logits {found['logits']['shape']}")
    for stage in found["stages"]:
        print(f"  {stage['name']:<7} {str(stage['shape']):<20} {stage['tensor']}")


def show_plan(teacher: Path, student: Path) -> None:
    plan = kdgraph.merge(teacher, student, ["kd", "at"], dry_run=True)["plan"]
    print(f"loss weights {plan['hyper']}")
    for pair in plan["pairs"]:
        print(f"  {pair['method']} {pair['stage']}: {pair['teacher']['tensor']} -> {pair['student']['tensor']}")
    for warning in plan["warnings"]:
        print(f"  warning: {warning}")


def write_joint(teacher: Path, student: Path, out_dir: Path) -> None:
    result = kdgraph.merge(teacher, student, ["kd", "at"], out=out_dir / "joint.onnx")
    for run in result["check"]:
        print(f"tract check of {Path(run['model']).name}: " +
              ", ".join(f"{t['name']} {t['value']:.4g}" for t in run["terms"]))
    print("wrote " + ", ".join(Path(p).name for p in result["written"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--teacher", type=Path, help="a teacher ONNX file (default: export resnet34)")
    parser.add_argument("--student", type=Path, help="a student ONNX file (default: export resnet18)")
    args = parser.parse_args()
    if (args.teacher is None) != (args.student is None):
        parser.error("give both --teacher and --student, or neither")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    teacher, student = (args.teacher, args.student) if args.teacher else export_torchvision(args.out_dir)
    try:
        show_stages(student)
        show_plan(teacher, student)
        write_joint(teacher, student, args.out_dir)
    except kdgraph.KdgraphError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

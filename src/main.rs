//! The kdgraph command line: parse arguments, call the library, print, and exit with 0, 1 or 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kdgraph::check::Term;
use kdgraph::{report, Error, MethodName, PlanOptions, Result};

#[derive(Parser)]
#[command(
    name = "kdgraph",
    version,
    about = "Merge a teacher and a student ONNX model into one knowledge-distillation training graph",
    allow_negative_numbers = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's inputs, stages (with pre-ReLU taps), embedding and logits.
    Inspect {
        /// The ONNX model to inspect.
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Sizes of the image input besides the batch (C,H,W), for models exported with symbolic sizes.
        #[arg(long, value_name = "C,H,W", value_parser = parse_dims)]
        input_shape: Option<Dims>,
    },
    /// Pair the teacher's and the student's taps and write the joint training graph.
    Merge(MergeArgs),
    /// Run a joint graph with tract on seeded inputs and print every loss term.
    Check {
        /// The joint graph written by `kdgraph merge`.
        joint: PathBuf,
        /// Batch size of the run.
        #[arg(long, default_value_t = 4)]
        batch: usize,
    },
}

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
struct MergeArgs {
    /// The frozen teacher model.
    teacher: PathBuf,
    /// The student model to train.
    student: PathBuf,
    /// Distillation method; repeat to combine several.
    #[arg(long = "method", short = 'm', value_enum, required = true)]
    methods: Vec<MethodName>,
    /// The joint graph to write; its sidecar goes beside it with the extension .json.
    #[arg(short = 'o', long, default_value = "joint.onnx")]
    output: PathBuf,
    /// Show the plan (which tensors are paired, pools, connectors, weights); write no graph.
    #[arg(long)]
    dry_run: bool,
    /// Do not run the written graph with tract before writing it.
    #[arg(long)]
    no_check: bool,
    /// Batch size of the tract check.
    #[arg(long, default_value_t = 4)]
    check_batch: usize,
    /// CRD: the number of samples in the training set (the size of the memory banks).
    #[arg(long, value_name = "N", help_heading = "Method options")]
    crd_n_data: Option<i64>,
    /// CRD: negatives per sample.
    #[arg(long, value_name = "K", default_value_t = kdgraph::methods::crd::DEFAULT_NEGATIVES, help_heading = "Method options")]
    crd_negatives: i64,
    /// Run the teacher's BatchNorms on batch statistics (as the OFD reference) instead of folding them;
    /// ONNX Runtime Training then updates their running statistics.
    #[arg(long, help_heading = "Method options")]
    teacher_batch_statistics: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also write a Graphviz picture of both stage chains and the pairs to this file.
    #[arg(long, value_name = "FILE")]
    dot: Option<PathBuf>,
    /// Pair these tensors instead of the automatic pairing (repeatable).
    #[arg(long = "tap", value_name = "TEACHER_TENSOR=STUDENT_TENSOR", value_parser = parse_tap)]
    taps: Vec<(String, String)>,
    /// Sizes of the image input besides the batch (C,H,W), for models exported with symbolic sizes.
    #[arg(long, value_name = "C,H,W", value_parser = parse_dims)]
    input_shape: Option<Dims>,
    /// Weight of the KD term (default: 0.9 with --method kd, else 0).
    #[arg(long, help_heading = "Loss weights")]
    alpha: Option<f64>,
    /// Weight of a method's term: B when one feature method is chosen, else METHOD=B (repeatable; default per method).
    #[arg(long, value_name = "[METHOD=]B", value_parser = parse_beta, help_heading = "Loss weights")]
    beta: Vec<(Option<MethodName>, f64)>,
    /// Weight of the cross-entropy term (default: 0.1 with --method kd, else 1).
    #[arg(long, help_heading = "Loss weights")]
    gamma: Option<f64>,
    /// KD temperature.
    #[arg(
        short = 'T',
        long = "temperature",
        default_value_t = 4.0,
        help_heading = "Loss weights"
    )]
    temperature: f64,
}

fn parse_tap(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((t, s)) if !t.is_empty() && !s.is_empty() => Ok((t.to_string(), s.to_string())),
        _ => Err(format!("expected TEACHER_TENSOR=STUDENT_TENSOR, got `{s}`")),
    }
}

/// `--input-shape 3,224,224`: sizes of the image input besides the batch.
#[derive(Clone, Debug)]
struct Dims(Vec<i64>);

fn parse_dims(s: &str) -> std::result::Result<Dims, String> {
    s.split([',', 'x'])
        .map(|d| match d.trim().parse::<i64>() {
            Ok(n) if n > 0 && n <= 1 << 20 => Ok(n),
            _ => Err(format!("`{s}`: expected positive sizes such as 3,224,224")),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Dims)
}

/// The folder of `-o` must exist before any model is read.
fn check_output_folder(output: &std::path::Path) -> Result<()> {
    let folder = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !folder.is_dir() {
        return Err(Error::usage(format!(
            "cannot write `{}`: the folder `{}` does not exist (or is not a folder); create it first",
            output.display(),
            folder.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::usage(format!(
            "-o `{}` is a folder; give the graph a file name",
            output.display()
        )));
    }
    Ok(())
}

fn parse_beta(s: &str) -> std::result::Result<(Option<MethodName>, f64), String> {
    let number = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("`{v}` is not a number"))
    };
    match s.split_once('=') {
        Some((m, v)) => {
            let method = <MethodName as clap::ValueEnum>::from_str(m, true)
                .map_err(|_| format!("`{m}` is not a method (kd, fitnet, at, sp, cc, vid, rkd, pkt, ab, ft, fsp, nst, crd, ofd)"))?;
            Ok((Some(method), number(v)?))
        }
        None => Ok((None, number(s)?)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Inspect {
            model,
            json,
            input_shape,
        } => {
            let analysis = kdgraph::inspect(&model, input_shape.as_ref().map(|d| d.0.as_slice()))?;
            print!(
                "{}",
                if json {
                    report::analysis_json(&analysis) + "\n"
                } else {
                    report::analysis_text(&analysis)
                }
            );
            Ok(())
        }
        Command::Merge(args) => merge(args),
        Command::Check { joint, batch } => {
            if batch == 0 {
                return Err(Error::usage("--batch must be at least 1"));
            }
            let terms = kdgraph::check_joint(&joint, batch)?;
            print!(
                "{}",
                show_terms(&joint.display().to_string(), batch, &terms)
            );
            Ok(())
        }
    }
}

fn show_terms(model: &str, batch: usize, terms: &[Term]) -> String {
    let mut out = format!("tract run of {model} at batch {batch}:\n");
    for term in terms {
        out += &format!("  {:<12} {}\n", term.name, term.value);
    }
    out
}

fn merge(args: MergeArgs) -> Result<()> {
    let options = PlanOptions {
        methods: args.methods,
        taps: args.taps,
        gamma: args.gamma,
        alpha: args.alpha,
        betas: args.beta,
        temperature: args.temperature,
        crd_n_data: args.crd_n_data,
        crd_negatives: args.crd_negatives,
        teacher_batch_statistics: args.teacher_batch_statistics,
        input_shape: args.input_shape.map(|d| d.0),
    };
    if args.check_batch == 0 {
        return Err(Error::usage("--check-batch must be at least 1"));
    }
    let inputs = [args.teacher.as_path(), args.student.as_path()];
    if let Some(dot) = &args.dot {
        kdgraph::onnx::io::ensure_not_an_input(dot, &inputs)?;
    }
    if !args.dry_run {
        kdgraph::onnx::io::ensure_not_an_input(&args.output, &inputs)?;
        check_output_folder(&args.output)?;
        if options.methods.contains(&MethodName::Crd) && options.crd_n_data.is_none() {
            return Err(Error::usage(
                "crd needs --crd-n-data N, the number of samples in the training set (the size of its memory banks)",
            ));
        }
    }
    let merge = kdgraph::plan_merge(&args.teacher, &args.student, &options)?;
    let dot = args
        .dot
        .as_ref()
        .map(|path| (path.clone(), report::plan_dot(&merge.plan)));
    let write_dot = || -> Result<()> {
        if let Some((path, text)) = &dot {
            let mut write = kdgraph::onnx::io::AtomicWrite::new();
            write.stage(path, text.as_bytes())?;
            write.commit()?;
        }
        Ok(())
    };
    if args.dry_run {
        write_dot()?;
        print!(
            "{}",
            if args.json {
                report::plan_json(&merge.plan) + "\n"
            } else {
                report::plan_text(&merge.plan)
            }
        );
        return Ok(());
    }
    if !args.json {
        print!("{}", report::plan_text(&merge.plan));
    }
    let check = (!args.no_check).then_some(args.check_batch);
    let checks = kdgraph::write_joint(&merge, &args.output, check)?;
    write_dot()?;
    let sidecar = kdgraph::sidecar_path(&args.output);
    if args.json {
        let runs: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"stage": c.stage, "model": c.path, "terms": c.terms}))
            .collect();
        let summary = serde_json::json!({
            "output": args.output, "sidecar": sidecar, "check_batch": check, "check": runs,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("a summary always serialises")
        );
    } else {
        for c in &checks {
            print!(
                "{}",
                show_terms(&c.path.display().to_string(), args.check_batch, &c.terms)
            );
        }
        println!("wrote {} and {}", args.output.display(), sidecar.display());
        if merge
            .plan
            .methods
            .iter()
            .any(|&m| kdgraph::methods::registry(m).has_init_stage())
        {
            let init = args.output.with_extension("init.onnx");
            println!(
                "wrote {} and {}: train it first (the sidecar's stages say how long), then carry its weights into the main stage",
                init.display(),
                kdgraph::sidecar_path(&init).display()
            );
        }
    }
    Ok(())
}

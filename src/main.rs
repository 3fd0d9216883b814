//! The kdgraph command line: parse arguments, call the library, print, and exit with 0, 1 or 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use kdgraph::{
    report, Emit, Error, Length, Objective, Optimizer, OptionKind, OptionValue, Outcome, Pairing,
    PlanOptions, Result, ScheduleKind, Term, TrainOptions, TrainingStage,
};

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
    /// Differentiate a model: write a graph that also outputs the gradient of a loss with
    /// respect to every weight (standard ONNX operators; runs on stock onnxruntime and tract).
    Grad(GradArgs),
    /// Run any graph with tract on arrays from an .npz file and write every output to an .npz file.
    Run {
        /// The ONNX graph to run.
        model: PathBuf,
        /// An .npz with one array per graph input, saved under the input's name.
        #[arg(long, value_name = "NPZ")]
        inputs: PathBuf,
        /// The .npz to write, one array per graph output.
        #[arg(short = 'o', long, value_name = "NPZ")]
        output: PathBuf,
    },
    /// Train a merged graph on tract with the step graph `merge --emit step` wrote (no training
    /// runtime), and write the trained student as an inference model.
    Train(TrainArgs),
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
#[command(group(clap::ArgGroup::new("length").args(["epochs", "steps"])))]
struct TrainArgs {
    /// The sidecar of the main stage (joint.json) written by `kdgraph merge --emit step`.
    sidecar: PathBuf,
    /// Training data: an .npz with `x` (N, C, H, W) float32 images and `y` (N,) int64 labels.
    #[arg(long, value_name = "NPZ")]
    data: PathBuf,
    /// Validation data (same layout): the student's accuracy on it after every epoch.
    #[arg(long, value_name = "NPZ")]
    val: Option<PathBuf>,
    /// Epochs of the main stage (an epoch: every whole batch of the data once) [default: 1].
    #[arg(long)]
    epochs: Option<u64>,
    /// Steps of the main stage, instead of --epochs.
    #[arg(long)]
    steps: Option<u64>,
    /// Steps of the init stage, where the graph has one [default: --steps, else the epochs the
    /// sidecar prescribes].
    #[arg(long)]
    init_steps: Option<u64>,
    /// Batch size (the last partial batch of an epoch is dropped).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Learning-rate schedule over each stage's steps.
    #[arg(long, value_enum, default_value_t = ScheduleChoice::Constant)]
    schedule: ScheduleChoice,
    /// Seed of the shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Take the batches in the data file's order, every epoch (a stream prepared in advance,
    /// such as augmented epochs written one after another).
    #[arg(long)]
    no_shuffle: bool,
    /// Continue from this checkpoint (written every epoch and on Ctrl-C); give the same data,
    /// --batch, --lr, --schedule and length as the run that wrote it.
    #[arg(long, value_name = "NPZ")]
    resume: Option<PathBuf>,
    /// The trained student (an inference ONNX model).
    #[arg(short = 'o', long, default_value = "student.onnx")]
    output: PathBuf,
    /// The checkpoint to write [default: <output>.ckpt.npz].
    #[arg(long, value_name = "NPZ")]
    checkpoint: Option<PathBuf>,
    /// Also write every step's losses, learning rate and batch (and every validation) as JSON
    /// lines to this file (appended to when resuming).
    #[arg(long, value_name = "JSONL")]
    log: Option<PathBuf>,
    /// A progress line every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScheduleChoice {
    Constant,
    Cosine,
    Step,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("objective").required(true).args(["labels", "loss"])))]
struct GradArgs {
    /// The model to differentiate (a classifier with --labels).
    model: PathBuf,
    /// Differentiate the mean cross-entropy of the first output (logits [N, classes]) at an
    /// int64 input `labels` [N].
    #[arg(long)]
    labels: bool,
    /// Differentiate this scalar output of the model instead.
    #[arg(long, value_name = "OUTPUT")]
    loss: Option<String>,
    /// The initializers to differentiate with respect to (repeatable; default: the model's weights).
    #[arg(long, value_name = "INITIALIZER")]
    wrt: Vec<String>,
    /// The gradient graph to write; its sidecar goes beside it with the extension .json.
    #[arg(short = 'o', long, default_value = "grad.onnx")]
    output: PathBuf,
    /// Sizes of the image input besides the batch (C,H,W), for models exported with symbolic sizes.
    #[arg(long, value_name = "C,H,W", value_parser = parse_dims)]
    input_shape: Option<Dims>,
}

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
struct MergeArgs {
    /// The frozen teacher model.
    teacher: PathBuf,
    /// The student model to train.
    student: PathBuf,
    /// Distillation method; repeat to combine several.
    #[arg(long = "method", short = 'm', required = true, value_parser = method_ids())]
    methods: Vec<String>,
    /// The joint graph to write; its sidecar goes beside it with the extension .json.
    #[arg(short = 'o', long, default_value = "joint.onnx")]
    output: PathBuf,
    /// Show the plan (which tensors are paired, pools, connectors, weights); write no graph.
    #[arg(long)]
    dry_run: bool,
    /// What to write besides the joint graph (which ONNX Runtime Training trains): its gradient
    /// graph `<output>.grad.onnx`, or its training step `<output>.step.onnx` (forward, backward
    /// and the optimizer's update), both differentiated by kdgraph for stock onnxruntime and tract.
    #[arg(long, value_enum, default_value_t = EmitChoice::Joint)]
    emit: EmitChoice,
    /// The optimizer of the step graph (--emit step), as torch.optim computes it.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Adamw, help_heading = "Step graph")]
    optimizer: OptimizerChoice,
    /// Weight decay [default: 0.01 for adamw (decoupled), 5e-4 for sgd (L2, as RepDistiller)].
    #[arg(long, help_heading = "Step graph")]
    weight_decay: Option<f32>,
    /// SGD momentum (dampening 0).
    #[arg(long, default_value_t = 0.9, help_heading = "Step graph")]
    momentum: f32,
    /// SGD with Nesterov momentum.
    #[arg(long, help_heading = "Step graph")]
    nesterov: bool,
    /// AdamW's beta1,beta2.
    #[arg(long, value_name = "B1,B2", default_value = "0.9,0.999", value_parser = parse_betas, help_heading = "Step graph")]
    betas: (f32, f32),
    /// AdamW's epsilon.
    #[arg(long, default_value_t = 1e-8, help_heading = "Step graph")]
    eps: f32,
    /// Do not run the written graph with tract before writing it.
    #[arg(long)]
    no_check: bool,
    /// Batch size of the tract check: 2, the least at which the batch-relational methods (RKD, SP,
    /// CC, PKT, CRD) compute a relation; the check's cost grows with it.
    #[arg(long, default_value_t = 2)]
    check_batch: usize,
    /// Run the teacher's BatchNorms on batch statistics (as the OFD reference) instead of folding them;
    /// ONNX Runtime Training then updates their running statistics.
    #[arg(long, help_heading = "Method options")]
    teacher_batch_statistics: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also write a Graphviz picture of both models' taps and the pairs to this file: DOT text, or
    /// rendered by Graphviz's `dot` for a .svg, .png or .pdf file.
    #[arg(long, value_name = "FILE")]
    dot: Option<PathBuf>,
    /// Pair these taps instead of the automatic pairing (repeatable). Each side is a tensor name, a
    /// module path (its output: `--tap layer3=layer2`), or a stage index with its role's prefix
    /// (`--tap teacher:3=student:2`).
    #[arg(long = "tap", value_name = "TEACHER=STUDENT", value_parser = parse_tap)]
    taps: Vec<(String, String)>,
    /// Sizes of the image input besides the batch (C,H,W), for models exported with symbolic sizes.
    #[arg(long, value_name = "C,H,W", value_parser = parse_dims)]
    input_shape: Option<Dims>,
    /// How stage ends are paired: by position (RepDistiller's; where the counts differ, the
    /// deepest of each), or maps of equal resolution.
    #[arg(long, value_enum, default_value_t = Pairing::Position)]
    pairing: Pairing,
    /// Weight of the KD term (default: 0.9 with --method kd, else 0).
    #[arg(long, help_heading = "Loss weights")]
    alpha: Option<f64>,
    /// Weight of a method's term: B when one feature method is chosen, else METHOD=B (repeatable; default per method).
    #[arg(long, value_name = "[METHOD=]B", value_parser = parse_beta, help_heading = "Loss weights")]
    beta: Vec<(Option<String>, f64)>,
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

/// `--emit`: what `merge` writes besides the joint graph.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EmitChoice {
    Joint,
    Gradients,
    Step,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OptimizerChoice {
    Adamw,
    Sgd,
}

fn parse_betas(s: &str) -> std::result::Result<(f32, f32), String> {
    let values: Vec<f32> = s
        .split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("`{s}`: expected two numbers such as 0.9,0.999"))?;
    match values[..] {
        [b1, b2] if (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2) => Ok((b1, b2)),
        _ => Err(format!(
            "`{s}`: expected two numbers in [0, 1) such as 0.9,0.999"
        )),
    }
}

impl MergeArgs {
    /// What `--emit` and the step-graph options ask for.
    fn emit(&self) -> Result<Emit> {
        let weight_decay = self.weight_decay.unwrap_or(match self.optimizer {
            OptimizerChoice::Adamw => 0.01,
            OptimizerChoice::Sgd => 5e-4,
        });
        if !(weight_decay >= 0.0 && weight_decay.is_finite())
            || !(self.eps > 0.0)
            || !(0.0..1.0).contains(&self.momentum)
        {
            return Err(Error::usage(
                "--weight-decay must be >= 0, --eps > 0 and --momentum in [0, 1)",
            ));
        }
        Ok(match self.emit {
            EmitChoice::Joint => Emit::Joint,
            EmitChoice::Gradients => Emit::Gradients,
            EmitChoice::Step => Emit::Step(match self.optimizer {
                OptimizerChoice::Adamw => Optimizer::AdamW {
                    beta1: self.betas.0,
                    beta2: self.betas.1,
                    eps: self.eps,
                    weight_decay,
                },
                OptimizerChoice::Sgd => Optimizer::Sgd {
                    momentum: self.momentum,
                    nesterov: self.nesterov,
                    weight_decay,
                },
            }),
        })
    }
}

fn parse_tap(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((t, s)) if !t.is_empty() && !s.is_empty() => Ok((t.to_string(), s.to_string())),
        _ => Err(format!(
            "expected TEACHER=STUDENT (tensor names, module paths or teacher:N=student:N), got `{s}`"
        )),
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

/// The ids of every method, for `--method` and `--beta METHOD=B`.
fn method_ids() -> clap::builder::PossibleValuesParser {
    kdgraph::methods()
        .into_iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .into()
}

fn parse_beta(s: &str) -> std::result::Result<(Option<String>, f64), String> {
    let number = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("`{v}` is not a number"))
    };
    match s.split_once('=') {
        Some((m, v)) => {
            let known: Vec<&str> = kdgraph::methods().into_iter().map(|m| m.as_str()).collect();
            let method = m.to_ascii_lowercase();
            if !known.contains(&method.as_str()) {
                return Err(format!("`{m}` is not a method ({})", known.join(", ")));
            }
            Ok((Some(method), number(v)?))
        }
        None => Ok((None, number(s)?)),
    }
}

/// `merge` takes every method's options (`--crd-n-data N`, ...) from the methods' specs.
fn with_method_options(command: clap::Command) -> clap::Command {
    command.mut_subcommand("merge", |mut merge| {
        for method in kdgraph::methods() {
            for option in method.spec().options {
                let mut arg = clap::Arg::new(option.flag)
                    .long(option.flag)
                    .value_name(option.value_name)
                    .help_heading("Method options")
                    .help(format!(
                        "{}: {}{}",
                        method.as_str().to_uppercase(),
                        option.help,
                        option
                            .default
                            .map(|d| format!(" [default: {d}]"))
                            .unwrap_or_default()
                    ));
                arg = match option.kind {
                    OptionKind::Int => arg.value_parser(clap::value_parser!(i64)),
                    OptionKind::Float => arg.value_parser(clap::value_parser!(f64)),
                    OptionKind::Flag => arg.action(clap::ArgAction::SetTrue),
                };
                merge = merge.arg(arg);
            }
        }
        merge
    })
}

/// The method options given on the command line, by flag.
fn method_options(matches: &ArgMatches) -> Vec<(String, OptionValue)> {
    let Some(("merge", merge)) = matches.subcommand() else {
        return Vec::new();
    };
    let mut given = Vec::new();
    for method in kdgraph::methods() {
        for option in method.spec().options {
            let value = match option.kind {
                OptionKind::Int => merge
                    .get_one::<i64>(option.flag)
                    .map(|&v| OptionValue::Int(v)),
                OptionKind::Float => merge
                    .get_one::<f64>(option.flag)
                    .map(|&v| OptionValue::Float(v)),
                OptionKind::Flag => merge
                    .get_flag(option.flag)
                    .then_some(OptionValue::Flag(true)),
            };
            if let Some(value) = value {
                given.push((option.flag.to_string(), value));
            }
        }
    }
    given
}

fn main() -> ExitCode {
    let matches = with_method_options(Cli::command()).get_matches();
    let options = method_options(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli.command, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(command: Command, method_options: Vec<(String, OptionValue)>) -> Result<()> {
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
        Command::Merge(args) => merge(args, method_options),
        Command::Train(args) => train(args),
        Command::Grad(args) => grad(args),
        Command::Run {
            model,
            inputs,
            output,
        } => {
            let names = kdgraph::run_model(&model, &inputs, &output)?;
            println!("wrote {} ({} outputs)", output.display(), names.len());
            Ok(())
        }
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

fn merge(args: MergeArgs, method_options: Vec<(String, OptionValue)>) -> Result<()> {
    let emit = args.emit()?;
    let options = PlanOptions {
        pairing: args.pairing,
        methods: args.methods,
        taps: args.taps,
        gamma: args.gamma,
        alpha: args.alpha,
        betas: args.beta,
        temperature: args.temperature,
        method_options,
        teacher_batch_statistics: args.teacher_batch_statistics,
        input_shape: args.input_shape.map(|d| d.0),
    };
    if args.check_batch == 0 {
        return Err(Error::usage("--check-batch must be at least 1"));
    }
    let output = (!args.dry_run).then_some(args.output.as_path());
    kdgraph::check_request(
        &args.teacher,
        &args.student,
        &options,
        output,
        args.dot.as_deref(),
    )?;
    let merge = kdgraph::plan_merge(&args.teacher, &args.student, &options)?;
    if args.dry_run {
        if let Some(dot) = &args.dot {
            kdgraph::write_dot(&merge.plan, dot)?;
        }
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
    let kdgraph::Merge {
        teacher,
        student,
        plan,
    } = merge;
    let written = kdgraph::write_joint(teacher, student, &plan, &args.output, check, &emit)?;
    if let Some(dot) = &args.dot {
        kdgraph::write_dot(&plan, dot)?;
    }
    let sidecar = kdgraph::sidecar_path(&args.output);
    if args.json {
        let runs: Vec<_> = written
            .iter()
            .filter_map(|w| {
                let terms = w.terms.as_ref()?;
                Some(serde_json::json!({"stage": w.stage.name(), "model": w.graph, "terms": terms}))
            })
            .collect();
        let summary = serde_json::json!({
            "plan": plan, "output": args.output, "sidecar": sidecar,
            "written": written_files(&written, &emit, args.dot.as_deref()),
            "check_batch": check, "check": runs,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("a summary always serialises")
        );
        return Ok(());
    }
    for w in &written {
        if let Some(terms) = &w.terms {
            print!(
                "{}",
                show_terms(&w.graph.display().to_string(), args.check_batch, terms)
            );
        }
    }
    println!("wrote {} and {}", args.output.display(), sidecar.display());
    for w in &written {
        match emit {
            Emit::Joint => {}
            Emit::Gradients => println!(
                "wrote {}: the {} stage's gradients (outputs `<parameter>_grad`, listed in the sidecar)",
                kdgraph::gradient_path(&w.graph).display(),
                w.stage.name()
            ),
            Emit::Step(_) => println!(
                "wrote {}: the {} stage's training step (inputs and outputs listed in the sidecar's `step`)",
                kdgraph::step_path(&w.graph).display(),
                w.stage.name()
            ),
        }
    }
    if let Some(init) = written.iter().find(|w| w.stage == TrainingStage::Init) {
        println!(
            "wrote {} and {}: train it first (the sidecar's stages say how long), then carry its weights into the main stage",
            init.graph.display(),
            init.sidecar.display()
        );
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let length = match (args.epochs, args.steps) {
        (_, Some(steps)) => Length::Steps(steps),
        (epochs, None) => Length::Epochs(epochs.unwrap_or(1)),
    };
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        return Err(Error::usage("--lr must be a positive number"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| Error::io(format!("cannot handle Ctrl-C: {e}")))?;
    let checkpoint = args
        .checkpoint
        .unwrap_or_else(|| args.output.with_extension("ckpt.npz"));
    let options = TrainOptions {
        sidecar: args.sidecar,
        data: args.data,
        val: args.val,
        length,
        init_steps: args.init_steps,
        batch: args.batch,
        lr: args.lr,
        schedule: match args.schedule {
            ScheduleChoice::Constant => ScheduleKind::Constant,
            ScheduleChoice::Cosine => ScheduleKind::Cosine,
            ScheduleChoice::Step => ScheduleKind::Step,
        },
        seed: args.seed,
        no_shuffle: args.no_shuffle,
        resume: args.resume,
        output: args.output,
        checkpoint,
        log: args.log,
        log_every: args.log_every,
        stop,
    };
    match kdgraph::train(&options)? {
        Outcome::Finished { student, steps } => println!(
            "wrote {} ({steps} steps trained); checkpoint {}",
            student.display(),
            options.checkpoint.display()
        ),
        Outcome::Interrupted {
            checkpoint,
            stage,
            step,
        } => {
            println!(
                "interrupted after step {step} of the {stage} stage; wrote {}: continue with --resume {}",
                checkpoint.display(),
                checkpoint.display()
            );
            std::process::exit(INTERRUPTED);
        }
    }
    Ok(())
}

/// The exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: i32 = 130;

/// Every file a merge wrote: each stage's graph and sidecar, its gradient or step graph, the DOT file.
fn written_files(
    written: &[kdgraph::WrittenStage],
    emit: &Emit,
    dot: Option<&std::path::Path>,
) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for w in written {
        files.extend([w.graph.clone(), w.sidecar.clone()]);
        match emit {
            Emit::Joint => {}
            Emit::Gradients => files.push(kdgraph::gradient_path(&w.graph)),
            Emit::Step(_) => files.push(kdgraph::step_path(&w.graph)),
        }
    }
    files.extend(dot.map(PathBuf::from));
    files
}

fn grad(args: GradArgs) -> Result<()> {
    let objective = match args.loss {
        Some(loss) => Objective::Output(loss),
        None => Objective::CrossEntropy,
    };
    let written = kdgraph::write_gradients(
        &args.model,
        &objective,
        &args.wrt,
        &args.output,
        args.input_shape.as_ref().map(|d| d.0.as_slice()),
    )?;
    for note in &written.notes {
        println!("note: {note}");
    }
    println!(
        "wrote {} ({} gradients, {} running statistics) and {}",
        written.graph.display(),
        written.gradients,
        written.state,
        written.sidecar.display()
    );
    Ok(())
}

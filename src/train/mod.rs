//! `kdgraph train`: trains a merged graph's stages in order on tract with the step graph that
//! `merge --emit step` wrote: seeded shuffled batches, the learning-rate schedule, a progress
//! line every few steps, validation and a checkpoint every epoch (and on interruption), and at
//! the end the trained student written as an inference model.

mod checkpoint;
mod crd;
mod data;
mod export;
mod schedule;
mod session;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::builder::float_tensor;
use crate::onnx::{io, pb, proto};
use crate::sidecar::{read_training, TrainingStageFiles};
use crate::step::{Carried, Initial};
use checkpoint::Progress;
use crd::Crd;
use data::{DataSet, Expected, Shuffle};
use schedule::Schedule;
pub use schedule::ScheduleKind;
use session::{Batch, StepSession, Term};

/// How long the main stage trains.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    Epochs(u64),
    Steps(u64),
}

/// What `kdgraph train` was asked to do.
pub struct TrainOptions {
    /// The main stage's sidecar (or its graph).
    pub sidecar: PathBuf,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub length: Length,
    /// Steps of the init stage (default: --steps, or the epochs the sidecar prescribes).
    pub init_steps: Option<u64>,
    pub batch: usize,
    pub lr: f32,
    pub schedule: ScheduleKind,
    pub seed: u64,
    /// Take every epoch's batches in the data file's order instead of shuffling them.
    pub no_shuffle: bool,
    pub resume: Option<PathBuf>,
    /// The trained student.
    pub output: PathBuf,
    pub checkpoint: PathBuf,
    /// One JSON line per step (and per validation): the losses, learning rate and batch.
    pub log: Option<PathBuf>,
    /// A progress line every this many steps.
    pub log_every: u64,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// How training ended.
pub enum Outcome {
    Finished {
        student: PathBuf,
        steps: u64,
    },
    Interrupted {
        checkpoint: PathBuf,
        stage: String,
        step: u64,
    },
}

/// Trains every stage of the sidecar's graph in order and writes the student.
pub fn train(options: &TrainOptions) -> Result<Outcome> {
    if options.batch == 0 || options.log_every == 0 {
        return Err(Error::usage("--batch and --log-every must be at least 1"));
    }
    let stages = read_stages(&options.sidecar)?;
    let crds = stages
        .iter()
        .map(|stage| check_feedable(stage, options.seed))
        .collect::<Result<Vec<_>>>()?;
    let main = stages.last().expect("a sidecar lists its main stage");
    let shown = main.joint_path.display().to_string();
    let image = session::image_role(&main.sidecar, &shown)?;
    let image_dims = session::image_dims(image, &shown)?;
    let expected = Expected {
        image_dims: &image_dims,
        classes: class_count(main)?,
        batch: options.batch,
    };
    check_outputs(options, &stages)?;
    let data = DataSet::load(&options.data, &expected)?;
    for crd in crds.iter().flatten() {
        crd.check_data(data.sample_labels(), &options.data.display().to_string())?;
    }
    let val = match &options.val {
        Some(path) => Some(DataSet::load(
            path,
            &Expected {
                batch: 1,
                ..expected
            },
        )?),
        None => None,
    };
    let resume = match &options.resume {
        Some(path) => Some(read_resume(path, options, &data, stages.len())?),
        None => None,
    };
    let mut log = open_log(options.log.as_deref(), resume.is_some())?;
    let mut trainer = Trainer {
        options,
        crds: &crds,
        data: &data,
        val: val.as_ref(),
        image_dims: &image_dims,
        log: log.as_mut(),
    };
    trainer.run(&stages, resume)
}

/// Every stage's files, in training order (the main stage last).
fn read_stages(sidecar: &Path) -> Result<Vec<TrainingStageFiles>> {
    let main = read_training(sidecar)?;
    let folder = crate::sidecar::sidecar_path(sidecar)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut stages = Vec::new();
    for entry in &main.sidecar.stages {
        if entry.name == main.sidecar.stage {
            continue;
        }
        stages.push(read_training(&folder.join(&entry.sidecar))?);
    }
    stages.push(main);
    Ok(stages)
}

/// Refuses a stage whose graph takes inputs besides the images, the labels and CRD's, before
/// anything is read or written; CRD's sizes where the stage trains it.
fn check_feedable(stage: &TrainingStageFiles, seed: u64) -> Result<Option<Crd>> {
    let shown = stage.joint_path.display().to_string();
    let crd = Crd::of(&stage.sidecar, seed, &shown)?;
    let state: Vec<Carried> = crd.iter().flat_map(Crd::state).collect();
    let feedable = |name: &str, role: &str| {
        role == "image"
            || role == "labels"
            || (crd.is_some()
                && (name == crd::INDEX
                    || name == crd::CONTRAST_INDEX
                    || state.iter().any(|c| c.input == name)))
    };
    match stage
        .sidecar
        .inputs
        .iter()
        .find(|i| !feedable(&i.name, &i.role))
    {
        Some(input) => Err(Error::unsupported(format!(
            "`{shown}` takes an input `{}` ({}) that kdgraph train does not know how to feed; train it with examples/train_ort.py",
            input.name,
            input.role
        ))),
        None => Ok(crd),
    }
}

/// The student's class count: the bound the sidecar records for the labels.
fn class_count(main: &TrainingStageFiles) -> Result<i64> {
    main.sidecar
        .inputs
        .iter()
        .find(|i| i.role == "labels")
        .and_then(|i| i.index_bound)
        .ok_or_else(|| {
            Error::usage(format!(
                "`{}` is not a main-stage graph with labels; pass the main stage's sidecar (joint.json)",
                main.joint_path.display()
            ))
        })
}

/// The files train writes must not replace its inputs, and their folders must exist.
fn check_outputs(options: &TrainOptions, stages: &[TrainingStageFiles]) -> Result<()> {
    let mut inputs: Vec<&Path> = vec![&options.data, &options.sidecar];
    inputs.extend(options.val.as_deref());
    for stage in stages {
        inputs.push(&stage.joint_path);
        inputs.push(&stage.step_path);
    }
    let written = [
        Some(&options.output),
        Some(&options.checkpoint),
        options.log.as_ref(),
    ];
    for path in written.into_iter().flatten() {
        io::ensure_not_an_input(path, &inputs)?;
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !folder.is_dir() {
            return Err(Error::usage(format!(
                "cannot write `{}`: the folder `{}` does not exist; create it first",
                path.display(),
                folder.display()
            )));
        }
    }
    Ok(())
}

/// A checkpoint to resume from: where it stands and its arrays.
struct Resume {
    progress: Progress,
    arrays: Vec<(String, Tensor)>,
    path: PathBuf,
}

fn read_resume(
    path: &Path,
    options: &TrainOptions,
    data: &DataSet,
    stage_count: usize,
) -> Result<Resume> {
    let (progress, arrays) = checkpoint::load(path)?;
    if progress.batch != options.batch || progress.samples != data.len() {
        return Err(Error::usage(format!(
            "checkpoint `{}` was written with --batch {} on {} samples; resume with the same data and --batch",
            path.display(),
            progress.batch,
            progress.samples
        )));
    }
    if progress.stage >= stage_count {
        return Err(Error::usage(format!(
            "checkpoint `{}` is of stage {} of a graph with {stage_count} stages; resume with the graph it was written for",
            path.display(),
            progress.stage
        )));
    }
    Ok(Resume {
        progress,
        arrays,
        path: path.to_path_buf(),
    })
}

fn open_log(path: Option<&Path>, append: bool) -> Result<Option<BufWriter<File>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map(|f| Some(BufWriter::new(f)))
        .map_err(|e| Error::io(format!("cannot write the log `{}`: {e}", path.display())))
}

/// The loop's context: what every stage shares.
struct Trainer<'a> {
    options: &'a TrainOptions,
    /// CRD's sizes in each stage (in training order) where it trains there.
    crds: &'a [Option<Crd>],
    data: &'a DataSet,
    val: Option<&'a DataSet>,
    image_dims: &'a [usize],
    log: Option<&'a mut BufWriter<File>>,
}

/// The batches of a stage, epoch by epoch, from a seeded shuffle.
struct Batches {
    shuffle: Shuffle,
    /// `--no-shuffle`: the file's order every epoch (the shuffle is not drawn).
    in_file_order: bool,
    /// The shuffle's state at the start of the current epoch, and that epoch's order.
    epoch: Option<(u64, u64, Vec<usize>)>,
    per_epoch: u64,
    batch: usize,
}

impl Batches {
    /// The sample indices of step `step` (1 at the first step).
    fn indices(&mut self, step: u64) -> Vec<usize> {
        let epoch = (step - 1) / self.per_epoch;
        if self.epoch.as_ref().is_none_or(|(e, _, _)| *e != epoch) {
            let start = self.shuffle.state;
            let count = self.per_epoch as usize * self.batch;
            let order = if self.in_file_order {
                (0..count).collect()
            } else {
                self.shuffle.order(count)
            };
            self.epoch = Some((epoch, start, order));
        }
        let (_, _, order) = self.epoch.as_ref().expect("set above");
        let position = ((step - 1) % self.per_epoch) as usize * self.batch;
        order[position..position + self.batch].to_vec()
    }

    /// The shuffle state to resume from after `done` steps: the state at the start of the epoch
    /// of step `done + 1`.
    fn resume_state(&self, done: u64) -> u64 {
        match &self.epoch {
            Some((_, start, _)) if !done.is_multiple_of(self.per_epoch) => *start,
            _ => self.shuffle.state,
        }
    }
}

/// How a stage ended: trained to its last step, or stopped (Ctrl-C) after a step.
enum StageEnd {
    Done { values: Vec<Tensor>, steps: u64 },
    Stopped { step: u64 },
}

impl Trainer<'_> {
    fn run(
        &mut self,
        stages: &[TrainingStageFiles],
        mut resume: Option<Resume>,
    ) -> Result<Outcome> {
        let first = resume.as_ref().map_or(0, |r| r.progress.stage);
        let mut carried_over: HashMap<String, Tensor> = HashMap::new();
        let mut total = 0;
        for (index, stage) in stages.iter().enumerate().skip(first) {
            let is_main = index + 1 == stages.len();
            let values = match self.stage(index, stage, is_main, &carried_over, resume.take())? {
                StageEnd::Done { values, steps } => {
                    total += steps;
                    values
                }
                StageEnd::Stopped { step } => {
                    return Ok(Outcome::Interrupted {
                        checkpoint: self.options.checkpoint.clone(),
                        stage: stage.sidecar.stage.clone(),
                        step,
                    })
                }
            };
            if is_main {
                let joint = decode(&stage.joint_bytes, &stage.joint_path)?;
                let shown = stage.joint_path.display().to_string();
                let student = export::student_model(
                    &joint,
                    &stage.sidecar,
                    &stage.step.carried,
                    &values,
                    &shown,
                )?;
                export::write(student, &self.options.output)?;
            } else {
                carried_over = trained_parameters(&stage.step.carried, values);
            }
        }
        Ok(Outcome::Finished {
            student: self.options.output.clone(),
            steps: total,
        })
    }

    /// Trains one stage from its start, from `carried_over` parameters, or from a checkpoint.
    fn stage(
        &mut self,
        index: usize,
        stage: &TrainingStageFiles,
        is_main: bool,
        carried_over: &HashMap<String, Tensor>,
        resume: Option<Resume>,
    ) -> Result<StageEnd> {
        let options = self.options;
        let crd = self.crds[index].as_ref();
        // What the step reads and writes back: the step graph's carried values, then CRD's state.
        let carried: &Vec<Carried> = &stage
            .step
            .carried
            .iter()
            .cloned()
            .chain(crd.iter().flat_map(|c| c.state()))
            .collect();
        let joint = decode(&stage.joint_bytes, &stage.joint_path)?;
        let per_epoch = (self.data.len() / options.batch) as u64;
        let steps = self.stage_steps(stage, is_main, per_epoch);
        // `fixed`: what an earlier stage trained that this one keeps frozen (FT's paraphraser):
        // initializers of this stage's step graph, saved with every checkpoint.
        let (mut values, done, shuffle, fixed) = match resume {
            Some(mut r) => (
                {
                    println!(
                        "resuming the {} stage after step {} (epoch {}) from {}",
                        stage.sidecar.stage,
                        r.progress.step,
                        r.progress.epoch,
                        r.path.display()
                    );
                    checkpoint::take_values(&mut r.arrays, carried, &r.path)?
                },
                r.progress.step,
                Shuffle {
                    state: r.progress.shuffle_state,
                },
                r.arrays.into_iter().collect(),
            ),
            None => (
                {
                    let mut start = carried_over.clone();
                    start.extend(crd.iter().flat_map(|c| c.initial_state()));
                    initial_values(&joint, carried, &start, &stage.joint_path)?
                },
                0,
                Shuffle::seeded(options.seed.wrapping_add(index as u64)),
                carried_over
                    .iter()
                    .filter(|(name, _)| carried.iter().all(|c| c.input != **name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect(),
            ),
        };
        let step_shown = stage.step_path.display().to_string();
        let mut step_model = decode(&stage.step_bytes, &stage.step_path)?;
        replace_initializers(&mut step_model, &fixed)?;
        let mut session = StepSession::open(
            &step_model,
            &stage.sidecar,
            carried,
            crd,
            options.batch,
            &step_shown,
        )?;
        let schedule = Schedule {
            kind: options.schedule,
            base: options.lr,
            steps,
        };
        let mut batches = Batches {
            shuffle,
            in_file_order: options.no_shuffle,
            epoch: None,
            per_epoch,
            batch: options.batch,
        };
        let name = stage.sidecar.stage.as_str();
        let mut meter = Meter::start(done);
        for step in done + 1..=steps {
            let indices = batches.indices(step);
            let (images, labels) = self.data.batch(&indices);
            let samples: Vec<usize> = indices.iter().map(|&i| self.data.sample_id(i)).collect();
            let batch = Batch {
                images,
                labels,
                index: tensor1(&samples.iter().map(|&i| i as i64).collect::<Vec<_>>()),
                contrast: crd.map(|c| c.contrast_index(self.data.sample_labels(), &samples, step)),
            };
            let lr = schedule.rate(step);
            let (terms, next) = session.step(batch, values, lr, step)?;
            values = next;
            if let Some(bad) = terms.iter().find(|t| !t.value.is_finite()) {
                return Err(Error::unsupported(format!(
                    "{name} stage, step {step}: `{}` is {}; lower --lr (the last checkpoint is `{}`)",
                    bad.name,
                    bad.value,
                    options.checkpoint.display()
                )));
            }
            let epoch = (step - 1) / per_epoch + 1;
            self.log_step(name, step, epoch, lr, &indices, &terms)?;
            if step % options.log_every == 0 || step == steps {
                let rate = meter.images_per_second(step, options.batch);
                println!(
                    "{}",
                    progress_line(name, step, steps, epoch, lr, &terms, rate)
                );
            }
            let epoch_end = step % per_epoch == 0 || step == steps;
            if epoch_end && is_main {
                self.validate(&joint, stage, &values, epoch)?;
            }
            let stopping = options.stop.load(Ordering::SeqCst);
            if epoch_end || stopping {
                let progress = Progress {
                    stage: index,
                    step,
                    epoch: step / per_epoch,
                    shuffle_state: batches.resume_state(step),
                    batch: options.batch,
                    samples: self.data.len(),
                };
                checkpoint::save(&options.checkpoint, carried, &values, &fixed, &progress)?;
            }
            if stopping && step < steps {
                return Ok(StageEnd::Stopped { step });
            }
        }
        // CRD's state (the last values) ends with the stage.
        values.truncate(stage.step.carried.len());
        Ok(StageEnd::Done {
            values,
            steps: steps.saturating_sub(done),
        })
    }

    /// The stage's number of steps: the main stage's from --epochs or --steps; the init stage's
    /// from --init-steps, else --steps, else the epochs the sidecar prescribes.
    fn stage_steps(&self, stage: &TrainingStageFiles, is_main: bool, per_epoch: u64) -> u64 {
        let options = self.options;
        match (is_main, options.init_steps, options.length) {
            (false, Some(steps), _) | (_, _, Length::Steps(steps)) => steps,
            (true, _, Length::Epochs(epochs)) => epochs * per_epoch,
            (false, None, Length::Epochs(epochs)) => {
                let prescribed = stage
                    .sidecar
                    .stages
                    .iter()
                    .find(|s| s.name == stage.sidecar.stage)
                    .and_then(|s| s.epochs);
                prescribed.map_or(epochs, u64::from) * per_epoch
            }
        }
    }

    /// Validation accuracy of the student as it stands, printed and logged.
    fn validate(
        &mut self,
        joint: &pb::ModelProto,
        stage: &TrainingStageFiles,
        values: &[Tensor],
        epoch: u64,
    ) -> Result<()> {
        let Some(val) = self.val else {
            return Ok(());
        };
        let shown = stage.joint_path.display().to_string();
        let carried = &stage.step.carried;
        let student = export::student_model(
            joint,
            &stage.sidecar,
            carried,
            &values[..carried.len()],
            &shown,
        )?;
        let accuracy = validate::accuracy(&student, val, self.image_dims, self.options.batch)?;
        println!(
            "{} epoch {epoch}: validation accuracy {:.2}% ({} images)",
            stage.sidecar.stage,
            accuracy * 100.0,
            val.len()
        );
        self.log_line(serde_json::json!({
            "stage": stage.sidecar.stage, "epoch": epoch, "val_accuracy": accuracy,
        }))
    }

    fn log_step(
        &mut self,
        stage: &str,
        step: u64,
        epoch: u64,
        lr: f32,
        indices: &[usize],
        terms: &[Term],
    ) -> Result<()> {
        let mut line = serde_json::json!({
            "stage": stage, "step": step, "epoch": epoch, "lr": lr, "indices": indices,
        });
        for term in terms {
            line[&term.name] = serde_json::json!(term.value);
        }
        self.log_line(line)
    }

    fn log_line(&mut self, line: serde_json::Value) -> Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        writeln!(log, "{line}")
            .and_then(|_| log.flush())
            .map_err(|e| Error::io(format!("cannot write the log: {e}")))
    }
}

/// Images per second between progress lines.
struct Meter {
    since: Instant,
    step: u64,
}

impl Meter {
    fn start(step: u64) -> Meter {
        Meter {
            since: Instant::now(),
            step,
        }
    }

    fn images_per_second(&mut self, step: u64, batch: usize) -> f64 {
        let seconds = self.since.elapsed().as_secs_f64().max(1e-9);
        let rate = (step - self.step) as f64 * batch as f64 / seconds;
        *self = Meter::start(step);
        rate
    }
}

fn progress_line(
    stage: &str,
    step: u64,
    steps: u64,
    epoch: u64,
    lr: f32,
    terms: &[Term],
    images_per_second: f64,
) -> String {
    let terms: Vec<String> = terms
        .iter()
        .map(|t| format!("{} {:.4}", t.name, t.value))
        .collect();
    format!(
        "{stage} step {step}/{steps} epoch {epoch}  {}  lr {lr:.3e}  {images_per_second:.1} images/s",
        terms.join("  ")
    )
}

/// The first step's carried values: a previous stage's trained parameters by name, else the
/// joint graph's initializers, and zeros for the optimizer's moments.
fn initial_values(
    joint: &pb::ModelProto,
    carried: &[Carried],
    carried_over: &HashMap<String, Tensor>,
    shown: &Path,
) -> Result<Vec<Tensor>> {
    let graph = joint.graph.as_ref().expect("decoded models have graphs");
    let initializers = proto::initializers(graph);
    carried
        .iter()
        .map(|c| {
            let dims = session::dims_of(c);
            if let Some(value) = carried_over.get(&c.input).filter(|v| v.shape() == dims.as_slice()) {
                return Ok(value.clone());
            }
            let data = match c.initial {
                Initial::Zeros => vec![0.0f32; dims.iter().product()],
                Initial::Initializer => initializers
                    .get(c.input.as_str())
                    .and_then(|t| proto::float_values(t))
                    .ok_or_else(|| {
                        Error::invalid_model(format!(
                            "`{}` has no float32 initializer `{}`, a carried value of its step graph; run kdgraph merge again",
                            shown.display(),
                            c.input
                        ))
                    })?,
            };
            Tensor::from_shape(&dims, &data).map_err(|e| {
                Error::invalid_model(format!(
                    "`{}`: initializer `{}`: {e}",
                    shown.display(),
                    c.input
                ))
            })
        })
        .collect()
}

/// A finished stage's parameters and statistics by name (not its optimizer moments).
fn trained_parameters(carried: &[Carried], values: Vec<Tensor>) -> HashMap<String, Tensor> {
    carried
        .iter()
        .zip(values)
        .filter(|(c, _)| c.initial == Initial::Initializer)
        .map(|(c, v)| (c.input.clone(), v))
        .collect()
}

/// Replaces the float32 initializers of `model` that `values` names by those values.
fn replace_initializers(
    model: &mut pb::ModelProto,
    values: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let graph = model.graph.as_mut().expect("decoded models have graphs");
    for initializer in graph.initializer.iter_mut() {
        if let Some(value) = values.get(&initializer.name) {
            let data: Vec<f32> = value
                .to_plain_array_view::<f32>()
                .map_err(|e| Error::invalid_model(format!("value of `{}`: {e}", initializer.name)))?
                .iter()
                .copied()
                .collect();
            *initializer = float_tensor(&initializer.name, &initializer.dims, &data);
        }
    }
    Ok(())
}

fn decode(bytes: &[u8], path: &Path) -> Result<pb::ModelProto> {
    io::decode_model(bytes, path).map(|m| m.proto)
}

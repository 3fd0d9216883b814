//! Rules for convolution: Conv's gradients for its input, weight and bias, each written in the
//! formulation stock onnxruntime (CPU) runs fastest for the convolution's shape.

use super::Rule;
use crate::analysis::shapes::fixed;
use crate::autodiff::context::{Ctx, NodeView};
use crate::error::{Error, Result};
use crate::onnx::builder::Attr;

pub const RULES: &[(&str, Rule)] = &[("Conv", conv)];

type Adjoints = Result<Vec<Option<String>>>;

/// The geometry of a sliding window (a convolution's or a pool's) over the spatial axes, with
/// every attribute resolved: explicit pads, and the spatial sizes of the input and the output.
pub(super) struct Window {
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    pub pads_begin: Vec<i64>,
    pub pads_end: Vec<i64>,
    /// Spatial sizes of the input.
    pub input: Vec<i64>,
    /// Spatial sizes of the output (as shape inference found them, so ceil_mode is included).
    pub output: Vec<i64>,
}

impl Window {
    /// The window of node `n` with kernel `kernel`: strides, dilations and pads from its
    /// attributes (auto_pad resolved), spatial sizes from the shapes of input 0 and output 0.
    pub fn read(ctx: &Ctx, n: &NodeView, kernel: Vec<i64>) -> Result<Window> {
        let rank = kernel.len();
        let input = spatial_dims(ctx, n.input(0), rank)?;
        let output = spatial_dims(ctx, n.output(0), rank)?;
        let strides = n.attr_ints("strides").unwrap_or_else(|| vec![1; rank]);
        let dilations = n.attr_ints("dilations").unwrap_or_else(|| vec![1; rank]);
        if strides.len() != rank || dilations.len() != rank {
            return Err(Error::unsupported(
                "its strides or dilations do not match its kernel's rank",
            ));
        }
        if strides.iter().chain(&dilations).any(|&v| v < 1) {
            return Err(Error::unsupported(
                "its strides and dilations must be positive",
            ));
        }
        let mut window = Window {
            kernel,
            strides,
            dilations,
            pads_begin: vec![0; rank],
            pads_end: vec![0; rank],
            input,
            output,
        };
        window.resolve_pads(n)?;
        Ok(window)
    }

    fn rank(&self) -> usize {
        self.kernel.len()
    }

    /// Sets the explicit pads from `pads` or `auto_pad`.
    fn resolve_pads(&mut self, n: &NodeView) -> Result<()> {
        let rank = self.rank();
        match n.attr_string("auto_pad").as_deref().unwrap_or("NOTSET") {
            "NOTSET" => {
                let pads = n.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * rank]);
                if pads.len() != 2 * rank || pads.iter().any(|&p| p < 0) {
                    return Err(Error::unsupported(
                        "its pads must be 2 non-negative values per spatial axis",
                    ));
                }
                self.pads_begin = pads[..rank].to_vec();
                self.pads_end = pads[rank..].to_vec();
            }
            "VALID" => {}
            mode @ ("SAME_UPPER" | "SAME_LOWER") => {
                for d in 0..rank {
                    let total = ((self.output[d] - 1) * self.strides[d] + self.extent(d)
                        - self.input[d])
                        .max(0);
                    let small = total / 2;
                    let (begin, end) = if mode == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    self.pads_begin[d] = begin;
                    self.pads_end[d] = end;
                }
            }
            other => return Err(Error::unsupported(format!("auto_pad {other} is unknown"))),
        }
        Ok(())
    }

    /// The span of the window along axis `d`: (kernel - 1) * dilation + 1.
    fn extent(&self, d: usize) -> i64 {
        (self.kernel[d] - 1) * self.dilations[d] + 1
    }

    /// The number of taps of the window.
    pub fn taps(&self) -> i64 {
        self.kernel.iter().product()
    }

    /// The number of spatial positions of the input.
    pub fn input_size(&self) -> i64 {
        self.input.iter().product()
    }

    /// The number of spatial positions of the output.
    pub fn output_size(&self) -> i64 {
        self.output.iter().product()
    }

    /// The input coordinates along axis `d` that output position `o` reads with tap `t`
    /// (may fall in the padding: negative or past the end).
    fn coordinate(&self, d: usize, o: i64, t: i64) -> i64 {
        o * self.strides[d] + t * self.dilations[d] - self.pads_begin[d]
    }

    /// The flat input position that output position `o` reads with tap `t` (both flat,
    /// row-major), or `input_size()` (a padding slot) where it reads padding.
    pub fn tap_source(&self, o: i64, t: i64) -> i64 {
        let (out, taps) = (unflatten(o, &self.output), unflatten(t, &self.kernel));
        let mut flat = 0;
        for d in 0..self.rank() {
            let i = self.coordinate(d, out[d], taps[d]);
            if i < 0 || i >= self.input[d] {
                return self.input_size();
            }
            flat = flat * self.input[d] + i;
        }
        flat
    }

    /// The table of `tap_source` as a [taps, outputs] (`taps_first`) or [outputs, taps] list.
    pub fn tap_sources(&self, taps_first: bool) -> Vec<i64> {
        let (taps, outs) = (self.taps(), self.output_size());
        if taps_first {
            (0..taps)
                .flat_map(|t| (0..outs).map(move |o| (o, t)))
                .map(|(o, t)| self.tap_source(o, t))
                .collect()
        } else {
            (0..outs)
                .flat_map(|o| (0..taps).map(move |t| (o, t)))
                .map(|(o, t)| self.tap_source(o, t))
                .collect()
        }
    }

    /// How many taps of output position `o` (flat) read real input, not padding.
    pub fn valid_taps(&self, o: i64) -> i64 {
        (0..self.taps())
            .filter(|&t| self.tap_source(o, t) != self.input_size())
            .count() as i64
    }

    /// The ConvTranspose attributes (with `group`) that spread an output-shaped tensor back over
    /// the input grid, each output position onto the input positions its window covers: the
    /// pads crop the padding, and output_padding adds the trailing rows no window reaches, so
    /// that the result has exactly the input's spatial sizes.
    pub fn transpose_attrs(&self, group: i64) -> Result<Vec<(&'static str, Attr)>> {
        let rank = self.rank();
        let (mut end, mut extra) = (vec![0; rank], vec![0; rank]);
        for d in 0..rank {
            let reached = (self.output[d] - 1) * self.strides[d] + self.extent(d);
            let tail = self.input[d] + self.pads_begin[d] - reached;
            if tail >= self.strides[d].max(self.dilations[d]) {
                return Err(Error::unsupported(
                    "its output is too short for its input; kdgraph cannot map it back",
                ));
            }
            end[d] = (-tail).max(0);
            extra[d] = tail.max(0);
        }
        let pads = [self.pads_begin.clone(), end].concat();
        Ok(vec![
            ("kernel_shape", Attr::Ints(self.kernel.clone())),
            ("strides", Attr::Ints(self.strides.clone())),
            ("dilations", Attr::Ints(self.dilations.clone())),
            ("pads", Attr::Ints(pads)),
            ("output_padding", Attr::Ints(extra)),
            ("group", Attr::Int(group)),
        ])
    }
}

/// The coordinates of flat row-major index `flat` in a grid of sizes `dims`.
fn unflatten(mut flat: i64, dims: &[i64]) -> Vec<i64> {
    let mut coords = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        coords[d] = flat % dims[d];
        flat /= dims[d];
    }
    coords
}

/// The last `rank` dims of `tensor`, which must be fixed.
fn spatial_dims(ctx: &Ctx, tensor: &str, rank: usize) -> Result<Vec<i64>> {
    let shape = ctx.shape(tensor)?;
    if shape.len() != rank + 2 {
        return Err(Error::unsupported(format!(
            "`{tensor}` has rank {}, not {}",
            shape.len(),
            rank + 2
        )));
    }
    shape[2..]
        .iter()
        .map(|d| {
            fixed(d).ok_or_else(|| {
                Error::unsupported(format!(
                    "the spatial sizes of `{tensor}` must be fixed; give the model fixed input shapes"
                ))
            })
        })
        .collect()
}

/// The fixed channel count (dim 1) of `tensor`.
pub(super) fn channels(ctx: &Ctx, tensor: &str) -> Result<i64> {
    ctx.shape(tensor)?
        .get(1)
        .and_then(fixed)
        .ok_or_else(|| Error::unsupported(format!("the channel count of `{tensor}` must be fixed")))
}

/// A Conv's channel counts: input channels, output channels and groups.
struct Channels {
    input: i64,
    output: i64,
    groups: i64,
}

impl Channels {
    fn per_group_input(&self) -> i64 {
        self.input / self.groups
    }

    fn per_group_output(&self) -> i64 {
        self.output / self.groups
    }
}

/// d Conv(X, W, B): dX by ConvTranspose, dW in the form `weight_grad_form` picks, dB by ReduceSum.
fn conv(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let Some(dy) = dy[0].as_deref() else {
        return Ok(vec![None; n.node.input.len()]);
    };
    let weight = ctx.fixed_dims(n.input(1))?;
    if weight.len() < 3 {
        return Err(Error::unsupported(
            "its weight has no spatial axes; kdgraph differentiates 1-D and wider convolutions",
        ));
    }
    let window = Window::read(ctx, n, weight[2..].to_vec())?;
    let groups = n.attr_int("group", 1);
    let ch = Channels {
        input: channels(ctx, n.input(0))?,
        output: weight[0],
        groups,
    };
    if groups < 1 || ch.input % groups != 0 || ch.output % groups != 0 {
        return Err(Error::unsupported(format!(
            "group {groups} does not divide its channels"
        )));
    }
    let mut out = vec![None; n.node.input.len()];
    if n.needs(0) {
        out[0] = Some(input_grad(ctx, n, dy, &window, &ch)?);
    }
    if n.needs(1) {
        out[1] = Some(weight_grad(ctx, n, dy, &window, &ch));
    }
    if n.needs(2) {
        out[2] = Some(bias_grad(ctx, n, dy, &window, &ch));
    }
    Ok(out)
}

/// dX: for an ungrouped stride-1 convolution whose pads stay within the window, an ordinary Conv
/// of dY with W flipped and its channel axes swapped (onnxruntime runs it in its fast NCHWc
/// kernels: on resnet18's 3x3 layers at 2x2-16x16 the ConvTranspose took 1.5-3x as long);
/// otherwise ConvTranspose(dY, W) with the forward's strides, dilations, groups and pads.
fn input_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> Result<String> {
    if let Some(pads) = flipped_conv_pads(w, ch) {
        let flipped = flipped_weight(ctx, n, w.rank());
        let attrs = vec![
            ("kernel_shape", Attr::Ints(w.kernel.clone())),
            ("dilations", Attr::Ints(w.dilations.clone())),
            ("pads", Attr::Ints(pads)),
        ];
        return Ok(ctx.op("Conv", &[dy, &flipped], attrs, &n.name("dx")));
    }
    let attrs = w.transpose_attrs(ch.groups)?;
    Ok(ctx.op("ConvTranspose", &[dy, n.input(1)], attrs, &n.name("dx")))
}

/// The pads of the stride-1 Conv that maps dY back onto X's grid (extent - 1 - pad on each
/// side), when the convolution is ungrouped, of stride 1, and no pad exceeds extent - 1.
fn flipped_conv_pads(w: &Window, ch: &Channels) -> Option<Vec<i64>> {
    if ch.groups != 1 || w.strides.iter().any(|&s| s != 1) {
        return None;
    }
    let rank = w.rank();
    let side = |pads: &[i64]| -> Option<Vec<i64>> {
        (0..rank)
            .map(|d| {
                let p = w.extent(d) - 1 - pads[d];
                (p >= 0).then_some(p)
            })
            .collect()
    };
    Some([side(&w.pads_begin)?, side(&w.pads_end)?].concat())
}

/// W [M, C, k...] as [C, M, k...] with every spatial axis reversed.
fn flipped_weight(ctx: &mut Ctx, n: &NodeView, rank: usize) -> String {
    let perm: Vec<i64> = [1, 0].into_iter().chain(2..2 + rank as i64).collect();
    let swapped = ctx.b.transpose(n.input(1), &perm, &n.name("w_swapped"));
    let axes: Vec<i64> = (2..2 + rank as i64).collect();
    let b = &mut ctx.b;
    let starts = b.const_i64(&n.name("flip_starts"), &[rank as i64], &vec![-1; rank]);
    let ends = b.const_i64(&n.name("flip_ends"), &[rank as i64], &vec![i64::MIN; rank]);
    let axes = b.const_i64(&n.name("flip_axes"), &[rank as i64], &axes);
    let steps = b.const_i64(&n.name("flip_steps"), &[rank as i64], &vec![-1; rank]);
    b.op(
        "Slice",
        &[&swapped, &starts, &ends, &axes, &steps],
        vec![],
        &n.name("w_flipped"),
    )
}

/// dB = the sum of dY over the batch and the spatial axes.
fn bias_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> String {
    let axes: Vec<i64> = std::iter::once(0).chain(2..2 + w.rank() as i64).collect();
    let summed = ctx.b.reduce_sum(dy, &axes, &n.name("db_sum"));
    ctx.b.reshape(&summed, &[ch.output], &n.name("db"))
}

/// How the weight gradient dW[m, c, k] = sum over the batch and the output positions of
/// dY[n, m, o] * X[n, c, source(o, k)] is computed. Measured with bench/conv_weight_grad_forms.py
/// on onnxruntime 1.31 CPU, batch 32, 2 threads, CPU time over the forward Conv's (resnet18 and
/// MobileNetV2 shapes at 64x64; bench/README.md has the figures):
/// - `BatchTransposed`: one Conv of X (batch and channels swapped) with dY as its weight, strides
///   and dilations swapped, `group` kept. ORT runs its own im2col inside, which beats a Gather of
///   rows of fewer than 16 floats: depthwise 3x3 5.5x against 16-18x for the Gather forms
///   (im2col per group, Gather + MatMul, Gather + Mul + ReduceSum), the 7x7 stem over 3 channels
///   2.1x against 2.8-3.0x.
/// - `PointwiseBatched`: a 1x1 convolution without pads whose output has at least as many
///   positions as X has channels: one MatMul per batch element, dY [M, O] by X^T [O, C], and a
///   ReduceSum over the batch (0.8-1.4x; 1.7x as one Gemm).
/// - `Pointwise`: other 1x1 convolutions without pads (few positions, many channels: the
///   ReduceSum over N * M * C would cost more than the MatMuls): X at the strided positions and
///   dY as rows [N * O, channels], one Gemm(transA=1) (1.0x at 2x2 against 12.7x batched).
/// - `Im2col`: X in channels-last rows, one Gather with precomputed indices builds the columns
///   [N * O, K * C], and one Gemm(transA=1) contracts them with dY over N * O: the fastest for
///   3x3 convolutions of 16 channels or more (1.2-3.2x; the batch-transposed Conv takes 1.9-3.4x).
/// - `Im2colGrouped`: the same per group, one batched MatMul, for groups of 16 channels or more.
enum WeightGradForm {
    BatchTransposed,
    PointwiseBatched,
    Pointwise,
    Im2col,
    Im2colGrouped,
}

/// Below this many input channels per group, a Gather of channels-last rows is slower than ORT's
/// own im2col in the batch-transposed Conv.
const NARROW_ROWS: i64 = 16;

fn weight_grad_form(w: &Window, ch: &Channels) -> WeightGradForm {
    let pointwise =
        w.kernel.iter().all(|&k| k == 1) && w.pads_begin.iter().chain(&w.pads_end).all(|&p| p == 0);
    if ch.per_group_input() < NARROW_ROWS {
        WeightGradForm::BatchTransposed
    } else if ch.groups > 1 {
        WeightGradForm::Im2colGrouped
    } else if pointwise && w.output_size() >= ch.input {
        WeightGradForm::PointwiseBatched
    } else if pointwise {
        WeightGradForm::Pointwise
    } else {
        WeightGradForm::Im2col
    }
}

/// dW, in the formulation chosen for this convolution's shape.
fn weight_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> String {
    match weight_grad_form(w, ch) {
        WeightGradForm::BatchTransposed => weight_grad_batch_transposed(ctx, n, dy, w, ch),
        WeightGradForm::PointwiseBatched => weight_grad_pointwise_batched(ctx, n, dy, w, ch),
        WeightGradForm::Pointwise => weight_grad_pointwise(ctx, n, dy, w, ch),
        WeightGradForm::Im2col => weight_grad_im2col(ctx, n, dy, w, ch),
        WeightGradForm::Im2colGrouped => weight_grad_im2col_grouped(ctx, n, dy, w, ch),
    }
}

/// dW as Conv(X as [Cg, g * N, S], dY as [M, N, So], group g): output channel m of group j
/// correlates its dY plane with the X planes of group j, every batch element a channel; the
/// forward's dilations step the taps and its strides dilate dY. Then [Cg, M, K] -> [M, Cg, K].
fn weight_grad_batch_transposed(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    w: &Window,
    ch: &Channels,
) -> String {
    let (g, cg) = (ch.groups, ch.per_group_input());
    let rank = w.rank() as i64;
    let x = ctx
        .b
        .reshape(n.input(0), &[0, g, cg, w.input_size()], &n.name("dw/x"));
    let x = ctx.b.transpose(&x, &[2, 1, 0, 3], &n.name("dw/x_t"));
    let planes: Vec<i64> = [vec![cg, -1], w.input.clone()].concat();
    let x = ctx.b.reshape(&x, &planes, &n.name("dw/x_planes"));
    let spatial: Vec<i64> = (2..2 + rank).collect();
    let perm: Vec<i64> = [vec![1, 0], spatial.clone()].concat();
    let dyt = ctx.b.transpose(dy, &perm, &n.name("dw/dy_t"));
    let pads = [w.pads_begin.clone(), w.pads_end.clone()].concat();
    let attrs = vec![
        ("strides", Attr::Ints(w.dilations.clone())),
        ("dilations", Attr::Ints(w.strides.clone())),
        ("pads", Attr::Ints(pads)),
        ("group", Attr::Int(g)),
    ];
    let full = ctx.op("Conv", &[&x, &dyt], attrs, &n.name("dw/correlation"));
    let dw = crop_to_kernel(ctx, n, &full, w);
    ctx.b.transpose(&dw, &perm, &n.name("dw"))
}

/// The first `kernel` taps of each spatial axis of the batch-transposed Conv's output, which
/// may be longer where the forward's trailing input rows were read by no window.
fn crop_to_kernel(ctx: &mut Ctx, n: &NodeView, full: &str, w: &Window) -> String {
    let longer = (0..w.rank()).any(|d| {
        let span = w.input[d] + w.pads_begin[d] + w.pads_end[d] - (w.output[d] - 1) * w.strides[d];
        (span - 1) / w.dilations[d] + 1 > w.kernel[d]
    });
    if !longer {
        return full.to_string();
    }
    let rank = w.rank() as i64;
    let name = n.name("dw/cropped");
    let starts = ctx
        .b
        .const_i64(&format!("{name}.starts"), &[rank], &vec![0; w.rank()]);
    let ends = ctx.b.const_i64(&format!("{name}.ends"), &[rank], &w.kernel);
    let axes: Vec<i64> = (2..2 + rank).collect();
    let axes = ctx.b.const_i64(&format!("{name}.axes"), &[rank], &axes);
    ctx.op("Slice", &[full, &starts, &ends, &axes], vec![], &name)
}

/// dW of a 1x1 convolution without pads: X at the strided positions and dY as rows
/// [N * O, C] and [N * O, M], then dW = Gemm(dY rows^T, X rows).
fn weight_grad_pointwise(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    w: &Window,
    ch: &Channels,
) -> String {
    let x = strided(ctx, n, w);
    let x = channels_last_rows(ctx, &x, ch.input, w.output_size(), &n.name("dw/x_rows"));
    let dy = channels_last_rows(ctx, dy, ch.output, w.output_size(), &n.name("dw/dy_rows"));
    let dw = gemm_transposed_a(ctx, &dy, &x, &n.name("dw/product"));
    let dims: Vec<i64> = [vec![ch.output, ch.input], w.kernel.clone()].concat();
    ctx.b.reshape(&dw, &dims, &n.name("dw"))
}

/// dW of a 1x1 convolution without pads, per batch element: dY [M, O] times X at the strided
/// positions [O, C], then the sum over the batch.
fn weight_grad_pointwise_batched(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    w: &Window,
    ch: &Channels,
) -> String {
    let o = w.output_size();
    let x = strided(ctx, n, w);
    let x = channels_last(ctx, &x, ch.input, o, &n.name("dw/x_t"));
    let dy = ctx.b.reshape(dy, &[0, ch.output, o], &n.name("dw/dy_flat"));
    let per_sample = ctx.b.matmul(&dy, &x, &n.name("dw/per_sample"));
    let dw = ctx.b.reduce_sum(&per_sample, &[0], &n.name("dw/sum"));
    let dims: Vec<i64> = [vec![ch.output, ch.input], w.kernel.clone()].concat();
    ctx.b.reshape(&dw, &dims, &n.name("dw"))
}

/// X at the positions a 1x1 convolution reads: every stride-th element of each spatial axis.
fn strided(ctx: &mut Ctx, n: &NodeView, w: &Window) -> String {
    if w.strides.iter().all(|&s| s == 1) {
        return n.input(0).to_string();
    }
    let rank = w.rank() as i64;
    let name = n.name("dw/x_strided");
    let ends: Vec<i64> = (0..w.rank())
        .map(|d| (w.output[d] - 1) * w.strides[d] + 1)
        .collect();
    let starts = ctx
        .b
        .const_i64(&format!("{name}.starts"), &[rank], &vec![0; w.rank()]);
    let ends = ctx.b.const_i64(&format!("{name}.ends"), &[rank], &ends);
    let axes: Vec<i64> = (2..2 + rank).collect();
    let axes = ctx.b.const_i64(&format!("{name}.axes"), &[rank], &axes);
    let steps = ctx
        .b
        .const_i64(&format!("{name}.steps"), &[rank], &w.strides);
    ctx.op(
        "Slice",
        &[n.input(0), &starts, &ends, &axes, &steps],
        vec![],
        &name,
    )
}

/// [N, C, positions...] as channels-last rows [N * positions, C].
fn channels_last_rows(ctx: &mut Ctx, t: &str, channels: i64, positions: i64, name: &str) -> String {
    let t = channels_last(ctx, t, channels, positions, &format!("{name}/nhwc"));
    ctx.b.reshape(&t, &[-1, channels], name)
}

/// [N, C, positions...] as [N, positions, C].
pub(super) fn channels_last(
    ctx: &mut Ctx,
    t: &str,
    channels: i64,
    positions: i64,
    name: &str,
) -> String {
    let flat = ctx
        .b
        .reshape(t, &[0, channels, positions], &format!("{name}/flat"));
    ctx.b.transpose(&flat, &[0, 2, 1], name)
}

/// a^T b.
fn gemm_transposed_a(ctx: &mut Ctx, a: &str, b: &str, name: &str) -> String {
    ctx.op("Gemm", &[a, b], vec![("transA", Attr::Int(1))], name)
}

/// dW by im2col: X as channels-last rows [N, P+1, C] (a zero row for the taps that read padding),
/// one Gather of precomputed sources into columns [N * O, K * C], and Gemm(dY rows^T, columns).
fn weight_grad_im2col(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> String {
    let (c, m) = (ch.input, ch.output);
    let (p, o, k) = (w.input_size(), w.output_size(), w.taps());
    let x = channels_last(ctx, n.input(0), c, p, &n.name("dw/x_nhwc"));
    let x = pad_axis_end(ctx, &x, 3, 1, 0.0, &n.name("dw/x_pad"));
    let sources = ctx
        .b
        .const_i64(&n.name("dw/sources"), &[o, k], &w.tap_sources(false));
    let cols = gather(ctx, &x, &sources, 1, &n.name("dw/cols"));
    let cols = ctx.b.reshape(&cols, &[-1, k * c], &n.name("dw/cols_2d"));
    let dy = channels_last_rows(ctx, dy, m, o, &n.name("dw/dy_rows"));
    let dw = gemm_transposed_a(ctx, &dy, &cols, &n.name("dw/product"));
    kernel_last_to_weight(ctx, n, &dw, w, ch)
}

/// dW by im2col per group: X as [g, N, P+1, Cg], one Gather into columns [g, N * O, K * Cg],
/// and one MatMul with dY as [g, Mg, N * O].
fn weight_grad_im2col_grouped(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    w: &Window,
    ch: &Channels,
) -> String {
    let (g, cg, mg) = (ch.groups, ch.per_group_input(), ch.per_group_output());
    let (p, o, k) = (w.input_size(), w.output_size(), w.taps());
    let x = ctx.b.reshape(n.input(0), &[0, g, cg, p], &n.name("dw/x"));
    let x = ctx.b.transpose(&x, &[1, 0, 3, 2], &n.name("dw/x_t"));
    let x = pad_axis_end(ctx, &x, 4, 2, 0.0, &n.name("dw/x_pad"));
    let sources = ctx
        .b
        .const_i64(&n.name("dw/sources"), &[o, k], &w.tap_sources(false));
    let cols = gather(ctx, &x, &sources, 2, &n.name("dw/cols"));
    let cols = ctx
        .b
        .reshape(&cols, &[g, -1, k * cg], &n.name("dw/cols_2d"));
    let dyg = ctx.b.reshape(dy, &[0, g, mg, o], &n.name("dw/dy"));
    let dyg = ctx.b.transpose(&dyg, &[1, 2, 0, 3], &n.name("dw/dy_t"));
    let dyg = ctx.b.reshape(&dyg, &[g, mg, -1], &n.name("dw/dy_2d"));
    let dw = ctx.b.matmul(&dyg, &cols, &n.name("dw/product"));
    kernel_last_to_weight(ctx, n, &dw, w, ch)
}

/// [M, K * Cg] (taps major, channels minor) as the weight's layout [M, Cg, kernel...].
fn kernel_last_to_weight(
    ctx: &mut Ctx,
    n: &NodeView,
    dw: &str,
    w: &Window,
    ch: &Channels,
) -> String {
    let dims: Vec<i64> = [
        vec![ch.output],
        w.kernel.clone(),
        vec![ch.per_group_input()],
    ]
    .concat();
    let dw = ctx.b.reshape(dw, &dims, &n.name("dw/kernel_last"));
    let rank = w.rank() as i64;
    let perm: Vec<i64> = [vec![0, rank + 1], (1..=rank).collect()].concat();
    ctx.b.transpose(&dw, &perm, &n.name("dw"))
}

/// `x` (of rank `rank`) with one `value` appended at the end of `axis`.
pub(super) fn pad_axis_end(
    ctx: &mut Ctx,
    x: &str,
    rank: usize,
    axis: usize,
    value: f32,
    name: &str,
) -> String {
    let mut pads = vec![0; 2 * rank];
    pads[rank + axis] = 1;
    let pads = ctx
        .b
        .const_i64(&format!("{name}.pads"), &[2 * rank as i64], &pads);
    let value = ctx.b.scalar(&format!("{name}.value"), value);
    ctx.op("Pad", &[x, &pads, &value], vec![], name)
}

/// Gather along `axis`.
pub(super) fn gather(ctx: &mut Ctx, x: &str, indices: &str, axis: i64, name: &str) -> String {
    ctx.op(
        "Gather",
        &[x, indices],
        vec![("axis", Attr::Int(axis))],
        name,
    )
}

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
        if (0..rank).any(|d| self.pads_begin[d] >= self.extent(d)) {
            return Err(Error::unsupported(
                "a leading pad covers a whole window; kdgraph needs pads smaller than the window",
            ));
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

/// d Conv(X, W, B): dX by ConvTranspose, dW by an im2col Gather and a MatMul, dB by ReduceSum.
fn conv(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let Some(dy) = dy[0].as_deref() else {
        return Ok(vec![None; n.node.input.len()]);
    };
    let weight = ctx.fixed_dims(n.input(1))?;
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

/// dX = ConvTranspose(dY, W) with the forward's strides, dilations, groups and pads.
fn input_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> Result<String> {
    let attrs = w.transpose_attrs(ch.groups)?;
    Ok(ctx.op("ConvTranspose", &[dy, n.input(1)], attrs, &n.name("dx")))
}

/// dB = the sum of dY over the batch and the spatial axes.
fn bias_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> String {
    let axes: Vec<i64> = std::iter::once(0).chain(2..2 + w.rank() as i64).collect();
    let summed = ctx.b.reduce_sum(dy, &axes, &n.name("db_sum"));
    ctx.b.reshape(&summed, &[ch.output], &n.name("db"))
}

/// dW[m, c, k] = sum over batch and output positions of dY[n, m, o] * X[n, c, source(o, k)]:
/// im2col of X with one Gather of precomputed indices, then one MatMul per group.
fn weight_grad(ctx: &mut Ctx, n: &NodeView, dy: &str, w: &Window, ch: &Channels) -> String {
    let (g, cg, mg) = (ch.groups, ch.per_group_input(), ch.per_group_output());
    let (p, o, k) = (w.input_size(), w.output_size(), w.taps());
    // X [N, C, P] -> [g, N, P, Cg], one zero row appended for the taps that read padding.
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
    // dY [N, M, O] -> [g, Mg, N * O].
    let dyg = ctx.b.reshape(dy, &[0, g, mg, o], &n.name("dw/dy"));
    let dyg = ctx.b.transpose(&dyg, &[1, 2, 0, 3], &n.name("dw/dy_t"));
    let dyg = ctx.b.reshape(&dyg, &[g, mg, -1], &n.name("dw/dy_2d"));
    let dw = ctx.b.matmul(&dyg, &cols, &n.name("dw/product"));
    let kernel_last: Vec<i64> = [vec![ch.output], w.kernel.clone(), vec![cg]].concat();
    let dw = ctx.b.reshape(&dw, &kernel_last, &n.name("dw/kernel_last"));
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

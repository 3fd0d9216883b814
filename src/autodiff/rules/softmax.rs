//! Rules for normalisations along axes: Softmax, LogSoftmax, LayerNormalization.

use super::Rule;
use crate::autodiff::context::{first_adjoint, Ctx, NodeView};
use crate::error::{Error, Result};

pub const RULES: &[(&str, Rule)] = &[
    ("Softmax", softmax),
    ("LogSoftmax", log_softmax),
    ("LayerNormalization", layer_normalization),
];

type Adjoints = Result<Vec<Option<String>>>;

/// The `axis` attribute (default `default`) made non-negative for the input's rank.
fn axis(ctx: &Ctx, n: &NodeView, default: i64) -> Result<i64> {
    let rank = ctx.rank(n.input(0))? as i64;
    let axis = n.attr_int("axis", default);
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..rank.max(1)).contains(&axis) {
        return Err(Error::unsupported(format!(
            "its axis {} is out of range for rank {rank}",
            n.attr_int("axis", default)
        )));
    }
    Ok(axis)
}

/// Softmax's axis: one axis from opset 13 (before, it flattened the trailing axes).
fn softmax_axis(ctx: &Ctx, n: &NodeView) -> Result<i64> {
    if ctx.opset() < 13 {
        return Err(Error::unsupported(
            "before opset 13 it normalises over flattened trailing axes; export with opset 13 or later",
        ));
    }
    axis(ctx, n, -1)
}

/// d softmax(x): y * (dy - sum(dy * y)) along the axis.
fn softmax(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let axis = softmax_axis(ctx, n)?;
    let y = n.output(0);
    let dy_y = ctx.b.mul(dy, y, &n.name("dy_y"));
    let total = ctx.b.reduce_sum(&dy_y, &[axis], &n.name("total"));
    let centred = ctx.b.sub(dy, &total, &n.name("centred"));
    Ok(vec![Some(ctx.b.mul(y, &centred, &n.name("dx")))])
}

/// d log_softmax(x): dy - exp(y) * sum(dy) along the axis.
fn log_softmax(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let axis = softmax_axis(ctx, n)?;
    let total = ctx.b.reduce_sum(dy, &[axis], &n.name("total"));
    let probabilities = ctx.b.unary("Exp", n.output(0), &n.name("probabilities"));
    let spent = ctx.b.mul(&probabilities, &total, &n.name("spent"));
    Ok(vec![Some(ctx.b.sub(dy, &spent, &n.name("dx")))])
}

/// d layer_norm(x, scale, bias) over the axes from `axis` on: see `layer_norm_dx` for x;
/// dy * x_hat for scale and dy for bias, summed over the leading axes.
fn layer_normalization(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    if dy.iter().skip(1).any(Option::is_some) {
        return Err(Error::unsupported(
            "the loss reads its Mean or InvStdDev output; kdgraph differentiates only its Y output",
        ));
    }
    let dy = first_adjoint(dy)?;
    let first = axis(ctx, n, -1)?;
    let axes: Vec<i64> = (first..ctx.rank(n.input(0))? as i64).collect();
    let (scale, y) = (n.input(1), n.output(0));
    let (x_hat, inv_std) = normalised(ctx, n, &axes);
    let dx = n
        .needs(0)
        .then(|| layer_norm_dx(ctx, n, dy, &x_hat, &inv_std, &axes));
    let dscale = if n.needs(1) {
        let dy_x_hat = ctx.b.mul(dy, &x_hat, &n.name("dy_x_hat"));
        Some(ctx.unbroadcast(&dy_x_hat, scale, y)?)
    } else {
        None
    };
    let dbias = if n.needs(2) {
        Some(ctx.unbroadcast(dy, n.input(2), y)?)
    } else {
        None
    };
    Ok(vec![dx, dscale, dbias])
}

/// inv_std * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale, means over `axes`.
fn layer_norm_dx(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    x_hat: &str,
    inv_std: &str,
    axes: &[i64],
) -> String {
    let g = ctx.b.mul(dy, n.input(1), &n.name("g"));
    let mean_g = ctx.b.reduce_mean(&g, axes, &n.name("mean_g"));
    let g_x_hat = ctx.b.mul(&g, x_hat, &n.name("g_x_hat"));
    let mean_g_x_hat = ctx.b.reduce_mean(&g_x_hat, axes, &n.name("mean_g_x_hat"));
    let along = ctx.b.mul(x_hat, &mean_g_x_hat, &n.name("along"));
    let centred = ctx.b.sub(&g, &mean_g, &n.name("g_centred"));
    let projected = ctx.b.sub(&centred, &along, &n.name("projected"));
    ctx.b.mul(&projected, inv_std, &n.name("dx"))
}

/// (x_hat, inv_std) of a LayerNormalization: from its Mean and InvStdDev outputs where it has
/// them in x's type, else recomputed (biased variance, as the forward pass).
fn normalised(ctx: &mut Ctx, n: &NodeView, axes: &[i64]) -> (String, String) {
    let x = n.input(0);
    let (mean, inv_std) = (n.output(1), n.output(2));
    let x_type = ctx.elem_type(x);
    let reusable = !mean.is_empty()
        && !inv_std.is_empty()
        && ctx.elem_type(mean) == x_type
        && ctx.elem_type(inv_std) == x_type;
    let (centred, inv_std) = if reusable {
        let centred = ctx.b.sub(x, mean, &n.name("x_centred"));
        (centred, inv_std.to_string())
    } else {
        recomputed_statistics(ctx, n, axes)
    };
    let x_hat = ctx.b.mul(&centred, &inv_std, &n.name("x_hat"));
    (x_hat, inv_std)
}

/// (x - mean, 1 / sqrt(variance + epsilon)) of a LayerNormalization's input over `axes`.
fn recomputed_statistics(ctx: &mut Ctx, n: &NodeView, axes: &[i64]) -> (String, String) {
    let x = n.input(0);
    let mean = ctx.b.reduce_mean(x, axes, &n.name("mean"));
    let centred = ctx.b.sub(x, &mean, &n.name("x_centred"));
    let squares = ctx.b.square(&centred, &n.name("squares"));
    let variance = ctx.b.reduce_mean(&squares, axes, &n.name("variance"));
    let epsilon = ctx
        .b
        .scalar(&n.name("epsilon"), n.attr_float("epsilon", 1e-5));
    let shifted = ctx.b.add(&variance, &epsilon, &n.name("shifted"));
    let std = ctx.b.unary("Sqrt", &shifted, &n.name("std"));
    let inv_std = ctx.b.unary("Reciprocal", &std, &n.name("inv_std"));
    (centred, inv_std)
}

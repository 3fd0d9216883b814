//! Rules for element-wise operators: arithmetic with broadcasting, activations, casts.

use std::f32::consts::{FRAC_1_SQRT_2, PI};

use super::Rule;
use crate::autodiff::context::{first_adjoint, Ctx, NodeView};
use crate::error::{Error, Result};
use crate::onnx::builder::Attr;

pub const RULES: &[(&str, Rule)] = &[
    ("Add", add),
    ("Sub", sub),
    ("Mul", mul),
    ("Div", div),
    ("Neg", neg),
    ("Abs", abs),
    ("Exp", exp),
    ("Log", log),
    ("Sqrt", sqrt),
    ("Reciprocal", reciprocal),
    ("Pow", pow),
    ("Identity", identity),
    ("Relu", relu),
    ("LeakyRelu", leaky_relu),
    ("PRelu", prelu),
    ("Elu", elu),
    ("Sigmoid", sigmoid),
    ("HardSigmoid", hard_sigmoid),
    ("HardSwish", hard_swish),
    ("Tanh", tanh),
    ("Erf", erf),
    ("Softplus", softplus),
    ("Gelu", gelu),
    ("Clip", clip),
    ("Max", extremum),
    ("Min", extremum),
    ("Where", where_),
    ("Cast", cast),
    ("Dropout", dropout),
    ("Sum", sum),
    ("Mean", mean),
];

type Adjoints = Result<Vec<Option<String>>>;

/// Each input's adjoint from the output-shaped `grads` (None where not needed), summed over the
/// axes broadcasting added or stretched.
fn unbroadcast_each(ctx: &mut Ctx, n: &NodeView, grads: Vec<Option<String>>) -> Adjoints {
    grads
        .into_iter()
        .enumerate()
        .map(|(i, grad)| match grad {
            Some(grad) if n.needs(i) => {
                Ok(Some(ctx.unbroadcast(&grad, n.input(i), n.output(0))?))
            }
            _ => Ok(None),
        })
        .collect()
}

/// The adjoint of a one-input op: dy * `factor`.
fn scaled(ctx: &mut Ctx, n: &NodeView, dy: &str, factor: &str) -> Adjoints {
    Ok(vec![Some(ctx.b.mul(dy, factor, &n.name("dx")))])
}

/// d(a + b): dy to each side, summed over broadcast axes.
fn add(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?.to_string();
    unbroadcast_each(ctx, n, vec![Some(dy.clone()), Some(dy)])
}

/// d(a - b): dy and -dy, summed over broadcast axes.
fn sub(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let neg = n.needs(1).then(|| ctx.b.unary("Neg", dy, &n.name("neg")));
    unbroadcast_each(ctx, n, vec![Some(dy.to_string()), neg])
}

/// d(a * b): dy * b and dy * a, summed over broadcast axes.
fn mul(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let grads = (0..2)
        .map(|i| {
            n.needs(i)
                .then(|| ctx.b.mul(dy, n.input(1 - i), &n.name(&format!("d{i}"))))
        })
        .collect();
    unbroadcast_each(ctx, n, grads)
}

/// d(a / b): dy / b and -(dy / b) * y, summed over broadcast axes.
fn div(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let da = ctx.b.div(dy, n.input(1), &n.name("d0"));
    let db = n.needs(1).then(|| {
        let times_y = ctx.b.mul(&da, n.output(0), &n.name("d1_pos"));
        ctx.b.unary("Neg", &times_y, &n.name("d1"))
    });
    unbroadcast_each(ctx, n, vec![Some(da), db])
}

/// d(-x): -dy.
fn neg(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    Ok(vec![Some(ctx.b.unary("Neg", dy, &n.name("dx")))])
}

/// d|x|: dy * sign(x) (0 at 0, as torch).
fn abs(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let sign = ctx.b.unary("Sign", n.input(0), &n.name("sign"));
    scaled(ctx, n, dy, &sign)
}

/// d exp(x): dy * y.
fn exp(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    scaled(ctx, n, dy, n.output(0))
}

/// d log(x): dy / x.
fn log(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    Ok(vec![Some(ctx.b.div(dy, n.input(0), &n.name("dx")))])
}

/// d sqrt(x): 0.5 * dy / y.
fn sqrt(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let half = ctx.b.scalar(&n.name("half"), 0.5);
    let half_dy = ctx.b.mul(dy, &half, &n.name("half_dy"));
    Ok(vec![Some(ctx.b.div(&half_dy, n.output(0), &n.name("dx")))])
}

/// d(1 / x): -dy * y^2.
fn reciprocal(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let y2 = ctx.b.square(n.output(0), &n.name("y2"));
    let neg_y2 = ctx.b.unary("Neg", &y2, &n.name("neg_y2"));
    scaled(ctx, n, dy, &neg_y2)
}

/// d x^b, as torch: dy * b * x^(b-1) (0 where b = 0) and dy * y * ln x (0 where x = 0 <= b).
fn pow(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let (x, y) = (n.input(0), n.output(0));
    let b = exponent_like_base(ctx, n);
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let dx = n.needs(0).then(|| {
        let one = ctx.b.scalar(&n.name("one"), 1.0);
        let b_minus_1 = ctx.b.sub(&b, &one, &n.name("b_minus_1"));
        let power = ctx.b.binary("Pow", x, &b_minus_1, &n.name("x_pow"));
        let slope = ctx.b.mul(&b, &power, &n.name("slope"));
        let grad = ctx.b.mul(dy, &slope, &n.name("d0_raw"));
        let b_zero = ctx.b.binary("Equal", &b, &zero, &n.name("b_zero"));
        ctx.op("Where", &[&b_zero, &zero, &grad], vec![], &n.name("d0"))
    });
    let db = n.needs(1).then(|| {
        let ln_x = ctx.b.unary("Log", x, &n.name("ln_x"));
        let slope = ctx.b.mul(y, &ln_x, &n.name("y_ln_x"));
        let grad = ctx.b.mul(dy, &slope, &n.name("d1_raw"));
        let x_zero = ctx.b.binary("Equal", x, &zero, &n.name("x_zero"));
        let b_nonneg = ctx
            .b
            .binary("GreaterOrEqual", &b, &zero, &n.name("b_nonneg"));
        let masked = ctx.b.binary("And", &x_zero, &b_nonneg, &n.name("masked"));
        ctx.op("Where", &[&masked, &zero, &grad], vec![], &n.name("d1"))
    });
    unbroadcast_each(ctx, n, vec![dx, db])
}

/// Pow's exponent in the base's element type (ONNX allows an integer exponent).
fn exponent_like_base(ctx: &mut Ctx, n: &NodeView) -> String {
    let (x, b) = (n.input(0), n.input(1));
    match (ctx.elem_type(x), ctx.elem_type(b)) {
        (Some(tx), Some(tb)) if tx != tb => ctx.op(
            "Cast",
            &[b],
            vec![("to", Attr::Int(tx as i64))],
            &n.name("b_cast"),
        ),
        _ => b.to_string(),
    }
}

/// d(identity): dy.
fn identity(_: &mut Ctx, _: &NodeView, dy: &[Option<String>]) -> Adjoints {
    Ok(vec![Some(first_adjoint(dy)?.to_string())])
}

/// `then` where x > 0, else `otherwise` (the piecewise activations' gradient).
fn where_positive(ctx: &mut Ctx, n: &NodeView, then: &str, otherwise: &str) -> String {
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let positive = ctx
        .b
        .binary("Greater", n.input(0), &zero, &n.name("positive"));
    ctx.op(
        "Where",
        &[&positive, then, otherwise],
        vec![],
        &n.name("dx"),
    )
}

/// d relu(x): dy where x > 0, else 0.
fn relu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    Ok(vec![Some(where_positive(ctx, n, dy, &zero))])
}

/// d leaky_relu(x): dy where x > 0, else alpha * dy.
fn leaky_relu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let alpha = ctx.b.scalar(&n.name("alpha"), n.attr_float("alpha", 0.01));
    let leak = ctx.b.mul(dy, &alpha, &n.name("leak"));
    Ok(vec![Some(where_positive(ctx, n, dy, &leak))])
}

/// d prelu(x, slope): dy or slope * dy for x; 0 or x * dy for the slope, summed over broadcast axes.
fn prelu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let positive = ctx
        .b
        .binary("Greater", n.input(0), &zero, &n.name("positive"));
    let dx = n.needs(0).then(|| {
        let leak = ctx.b.mul(dy, n.input(1), &n.name("leak"));
        ctx.op("Where", &[&positive, dy, &leak], vec![], &n.name("d0"))
    });
    let dslope = n.needs(1).then(|| {
        let dy_x = ctx.b.mul(dy, n.input(0), &n.name("dy_x"));
        ctx.op("Where", &[&positive, &zero, &dy_x], vec![], &n.name("d1"))
    });
    unbroadcast_each(ctx, n, vec![dx, dslope])
}

/// d elu(x): dy where x > 0, else dy * (y + alpha).
fn elu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let alpha = ctx.b.scalar(&n.name("alpha"), n.attr_float("alpha", 1.0));
    let y_alpha = ctx.b.add(n.output(0), &alpha, &n.name("y_alpha"));
    let negative = ctx.b.mul(dy, &y_alpha, &n.name("negative"));
    Ok(vec![Some(where_positive(ctx, n, dy, &negative))])
}

/// d sigmoid(x): dy * y * (1 - y).
fn sigmoid(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let y = n.output(0);
    let one = ctx.b.scalar(&n.name("one"), 1.0);
    let one_minus_y = ctx.b.sub(&one, y, &n.name("one_minus_y"));
    let slope = ctx.b.mul(y, &one_minus_y, &n.name("slope"));
    scaled(ctx, n, dy, &slope)
}

/// d hard_sigmoid(x): alpha * dy where 0 < y < 1, else 0.
fn hard_sigmoid(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let y = n.output(0);
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let one = ctx.b.scalar(&n.name("one"), 1.0);
    let alpha = ctx.b.scalar(&n.name("alpha"), n.attr_float("alpha", 0.2));
    let above = ctx.b.binary("Greater", y, &zero, &n.name("above"));
    let below = ctx.b.binary("Less", y, &one, &n.name("below"));
    let inside = ctx.b.binary("And", &above, &below, &n.name("inside"));
    let slope = ctx.b.mul(dy, &alpha, &n.name("slope"));
    let dx = ctx.op("Where", &[&inside, &slope, &zero], vec![], &n.name("dx"));
    Ok(vec![Some(dx)])
}

/// d hard_swish(x), as torch: 0 up to -3, dy * (x / 3 + 0.5) below 3, dy from 3.
fn hard_swish(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let x = n.input(0);
    let (zero, one) = (
        ctx.b.scalar(&n.name("zero"), 0.0),
        ctx.b.scalar(&n.name("one"), 1.0),
    );
    let (three, minus_three) = (
        ctx.b.scalar(&n.name("three"), 3.0),
        ctx.b.scalar(&n.name("minus_three"), -3.0),
    );
    let half = ctx.b.scalar(&n.name("half"), 0.5);
    let third = ctx.b.div(x, &three, &n.name("third"));
    let ramp = ctx.b.add(&third, &half, &n.name("ramp"));
    let below_three = ctx.b.binary("Less", x, &three, &n.name("below_three"));
    let upper = ctx.op(
        "Where",
        &[&below_three, &ramp, &one],
        vec![],
        &n.name("upper"),
    );
    let off = ctx.b.binary("LessOrEqual", x, &minus_three, &n.name("off"));
    let slope = ctx.op("Where", &[&off, &zero, &upper], vec![], &n.name("slope"));
    scaled(ctx, n, dy, &slope)
}

/// d tanh(x): dy * (1 - y^2).
fn tanh(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let one = ctx.b.scalar(&n.name("one"), 1.0);
    let y2 = ctx.b.square(n.output(0), &n.name("y2"));
    let slope = ctx.b.sub(&one, &y2, &n.name("slope"));
    scaled(ctx, n, dy, &slope)
}

/// d erf(x): dy * 2 / sqrt(pi) * exp(-x^2).
fn erf(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let bell = gaussian(ctx, n, -1.0);
    let scale = ctx.b.scalar(&n.name("scale"), 2.0 / PI.sqrt());
    let scaled_dy = ctx.b.mul(dy, &scale, &n.name("scaled_dy"));
    scaled(ctx, n, &scaled_dy, &bell)
}

/// exp(`factor` * x^2) of the node's input.
fn gaussian(ctx: &mut Ctx, n: &NodeView, factor: f32) -> String {
    let x2 = ctx.b.square(n.input(0), &n.name("x2"));
    let factor = ctx.b.scalar(&n.name("factor"), factor);
    let exponent = ctx.b.mul(&x2, &factor, &n.name("exponent"));
    ctx.b.unary("Exp", &exponent, &n.name("gaussian"))
}

/// d softplus(x): dy * sigmoid(x).
fn softplus(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let slope = ctx.b.unary("Sigmoid", n.input(0), &n.name("slope"));
    scaled(ctx, n, dy, &slope)
}

/// d gelu(x): dy * (cdf(x) + x * pdf(x)), exact or with the tanh approximation.
fn gelu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let slope = match n.attr_string("approximate").as_deref() {
        None | Some("none") => gelu_slope(ctx, n),
        Some("tanh") => gelu_tanh_slope(ctx, n),
        Some(other) => {
            return Err(Error::unsupported(format!(
                "its approximate=\"{other}\" is neither \"none\" nor \"tanh\""
            )))
        }
    };
    scaled(ctx, n, dy, &slope)
}

/// Phi(x) + x * phi(x), the exact gelu's derivative.
fn gelu_slope(ctx: &mut Ctx, n: &NodeView) -> String {
    let x = n.input(0);
    let (half, one) = (
        ctx.b.scalar(&n.name("half"), 0.5),
        ctx.b.scalar(&n.name("one"), 1.0),
    );
    let inv_sqrt2 = ctx.b.scalar(&n.name("inv_sqrt2"), FRAC_1_SQRT_2);
    let scaled_x = ctx.b.mul(x, &inv_sqrt2, &n.name("scaled_x"));
    let erf = ctx.b.unary("Erf", &scaled_x, &n.name("erf"));
    let erf_plus_1 = ctx.b.add(&erf, &one, &n.name("erf_plus_1"));
    let cdf = ctx.b.mul(&erf_plus_1, &half, &n.name("cdf"));
    let bell = gaussian(ctx, n, -0.5);
    let inv_sqrt_2pi = ctx
        .b
        .scalar(&n.name("inv_sqrt_2pi"), 1.0 / (2.0 * PI).sqrt());
    let pdf = ctx.b.mul(&bell, &inv_sqrt_2pi, &n.name("pdf"));
    let x_pdf = ctx.b.mul(x, &pdf, &n.name("x_pdf"));
    ctx.b.add(&cdf, &x_pdf, &n.name("slope"))
}

/// The derivative of 0.5 x (1 + tanh(u)), u = k (x + c x^3): 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx.
fn gelu_tanh_slope(ctx: &mut Ctx, n: &NodeView) -> String {
    const C: f32 = 0.044_715;
    let k = (2.0 / PI).sqrt();
    let x = n.input(0);
    let (half, one) = (
        ctx.b.scalar(&n.name("half"), 0.5),
        ctx.b.scalar(&n.name("one"), 1.0),
    );
    let (c, k3c, k) = (
        ctx.b.scalar(&n.name("c"), C),
        ctx.b.scalar(&n.name("k3c"), 3.0 * k * C),
        ctx.b.scalar(&n.name("k"), k),
    );
    let x2 = ctx.b.square(x, &n.name("x2"));
    let c_x2 = ctx.b.mul(&x2, &c, &n.name("c_x2"));
    let poly = ctx.b.add(&c_x2, &one, &n.name("poly"));
    let x_poly = ctx.b.mul(x, &poly, &n.name("x_poly"));
    let u = ctx.b.mul(&x_poly, &k, &n.name("u"));
    let t = ctx.b.unary("Tanh", &u, &n.name("t"));
    let k3c_x2 = ctx.b.mul(&x2, &k3c, &n.name("k3c_x2"));
    let du = ctx.b.add(&k3c_x2, &k, &n.name("du"));
    let t2 = ctx.b.square(&t, &n.name("t2"));
    let sech2 = ctx.b.sub(&one, &t2, &n.name("sech2"));
    let half_x = ctx.b.mul(x, &half, &n.name("half_x"));
    let outer = ctx.b.mul(&half_x, &sech2, &n.name("outer"));
    let chain = ctx.b.mul(&outer, &du, &n.name("chain"));
    let one_plus_t = ctx.b.add(&t, &one, &n.name("one_plus_t"));
    let direct = ctx.b.mul(&one_plus_t, &half, &n.name("direct"));
    ctx.b.add(&direct, &chain, &n.name("slope"))
}

/// The bounds of a Clip: inputs from opset 11, attributes before; None where unbounded.
fn clip_bounds(ctx: &mut Ctx, n: &NodeView) -> (Option<String>, Option<String>) {
    if ctx.opset() >= 11 {
        let input = |i: usize| n.has_input(i).then(|| n.input(i).to_string());
        return (input(1), input(2));
    }
    let mut attribute = |name: &str| {
        let value = n.attr_float(name, f32::NAN);
        (!value.is_nan()).then(|| ctx.b.scalar(&n.name(name), value))
    };
    (attribute("min"), attribute("max"))
}

/// d clip(x, min, max), as torch.clamp and hardtanh (ReLU6) with number bounds: dy where
/// min < x < max for x; a trainable bound gets dy where x reaches it (x <= min < max for min,
/// x >= max or max < min for max), so the gradient at a tie goes to the bound.
fn clip(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let x = n.input(0);
    let (min, max) = clip_bounds(ctx, n);
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let below = min
        .as_deref()
        .map(|m| ctx.b.binary("LessOrEqual", x, m, &n.name("below")));
    let above = max
        .as_deref()
        .map(|m| ctx.b.binary("GreaterOrEqual", x, m, &n.name("above")));
    let dx = n.needs(0).then(|| {
        let mut dx = dy.to_string();
        for outside in below.iter().chain(&above) {
            dx = ctx.op("Where", &[outside, &zero, &dx], vec![], &n.name("d0"));
        }
        dx
    });
    let (lo, hi) = (min.as_deref(), max.as_deref());
    let dmin = match (&below, n.needs(1)) {
        (Some(below), true) => {
            let mask = join_order(ctx, n, below, "And", lo.zip(hi));
            Some(ctx.op("Where", &[&mask, dy, &zero], vec![], &n.name("d1")))
        }
        _ => None,
    };
    let dmax = match (&above, n.needs(2)) {
        (Some(above), true) => {
            let mask = join_order(ctx, n, above, "Or", hi.zip(lo));
            Some(ctx.op("Where", &[&mask, dy, &zero], vec![], &n.name("d2")))
        }
        _ => None,
    };
    let mut out = unbroadcast_each(ctx, n, vec![None, dmin, dmax])?;
    out[0] = dx;
    Ok(out)
}

/// `mask` joined (`join`: And, Or) with a < b for `order` = (a, b); `mask` itself without one.
fn join_order(
    ctx: &mut Ctx,
    n: &NodeView,
    mask: &str,
    join: &str,
    order: Option<(&str, &str)>,
) -> String {
    match order {
        Some((a, b)) => {
            let less = ctx.b.binary("Less", a, b, &n.name("order"));
            ctx.b.binary(join, mask, &less, &n.name("mask"))
        }
        None => mask.to_string(),
    }
}

/// d max / d min of x_1, ..., x_k: dy * [x_i = y] / #{j : x_j = y} (ties share equally, as
/// torch.maximum and torch.amax), summed over broadcast axes.
fn extremum(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let inputs = n.node.input.len();
    if inputs == 1 {
        return Ok(vec![Some(dy.to_string())]);
    }
    let hits: Vec<String> = (0..inputs)
        .map(|i| {
            let equal = ctx.b.binary(
                "Equal",
                n.input(i),
                n.output(0),
                &n.name(&format!("hit{i}")),
            );
            ctx.float_mask(&equal, n.output(0), &n.name(&format!("hit{i}_f")))
        })
        .collect();
    let refs: Vec<&str> = hits.iter().map(String::as_str).collect();
    let count = ctx.op("Sum", &refs, vec![], &n.name("ties"));
    let share = ctx.b.div(dy, &count, &n.name("share"));
    let grads = hits
        .iter()
        .enumerate()
        .map(|(i, hit)| {
            n.needs(i)
                .then(|| ctx.b.mul(&share, hit, &n.name(&format!("d{i}"))))
        })
        .collect();
    unbroadcast_each(ctx, n, grads)
}

/// d where(c, a, b): dy where c for a, dy where not c for b; none for c.
fn where_(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let cond = n.input(0);
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let da = n
        .needs(1)
        .then(|| ctx.op("Where", &[cond, dy, &zero], vec![], &n.name("d1")));
    let db = n
        .needs(2)
        .then(|| ctx.op("Where", &[cond, &zero, dy], vec![], &n.name("d2")));
    unbroadcast_each(ctx, n, vec![None, da, db])
}

/// d cast(x): dy cast back to x's float type.
fn cast(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let (from, to) = (ctx.elem_type(n.input(0)), ctx.elem_type(n.output(0)));
    let Some(from) = from else {
        return Err(Error::unsupported(format!(
            "the element type of its input `{}` is unknown",
            n.input(0)
        )));
    };
    if Some(from) == to {
        return Ok(vec![Some(dy.to_string())]);
    }
    let dx = ctx.op(
        "Cast",
        &[dy],
        vec![("to", Attr::Int(from as i64))],
        &n.name("dx"),
    );
    Ok(vec![Some(dx)])
}

/// d dropout(x): dy * mask / (1 - ratio) in training mode, dy otherwise.
fn dropout(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    if !dropout_training(ctx, n)? {
        return Ok(vec![Some(dy.to_string())]);
    }
    let mask = n.output(1);
    if mask.is_empty() {
        return Err(Error::unsupported(
            "it runs in training mode without its mask output, which the gradient needs",
        ));
    }
    let one = ctx.b.scalar(&n.name("one"), 1.0);
    let ratio = match n.has_input(1) {
        true => n.input(1).to_string(),
        false => ctx.b.scalar(&n.name("ratio"), 0.5),
    };
    let keep = ctx.b.sub(&one, &ratio, &n.name("keep"));
    let scaled = ctx.b.div(dy, &keep, &n.name("scaled"));
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let dx = ctx.op("Where", &[mask, &scaled, &zero], vec![], &n.name("dx"));
    Ok(vec![Some(dx)])
}

/// Whether a Dropout runs in training mode: its training_mode input, which must be constant.
fn dropout_training(ctx: &Ctx, n: &NodeView) -> Result<bool> {
    if !n.has_input(2) {
        return Ok(false);
    }
    match ctx.const_bools(n.input(2)).as_deref() {
        Some([training]) => Ok(*training),
        _ => Err(Error::unsupported(format!(
            "its training_mode `{}` is not a constant bool; kdgraph needs to know the mode",
            n.input(2)
        ))),
    }
}

/// d(x_1 + ... + x_k): dy to each input, summed over broadcast axes.
fn sum(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let grads = vec![Some(dy.to_string()); n.node.input.len()];
    unbroadcast_each(ctx, n, grads)
}

/// d mean(x_1, ..., x_k): dy / k to each input, summed over broadcast axes.
fn mean(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let inputs = n.node.input.len();
    let count = ctx.b.scalar(&n.name("count"), inputs as f32);
    let share = ctx.b.div(dy, &count, &n.name("share"));
    unbroadcast_each(ctx, n, vec![Some(share); inputs])
}

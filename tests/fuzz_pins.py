"""Fuzz examples pinned as regression tests (tests/test_fuzz.py), as data: each a ModelSpec the
fuzzer drew, rebuilt with ``fuzz_models.build``; one block per line."""

# ruff: noqa: E501

from __future__ import annotations

from fuzz_models import (
    AfterAct,
    ConvNorm,
    ConvSpec,
    Fork,
    LinearNorm,
    LinearSpec,
    ModelSpec,
    NormFanout,
    NormSpec,
    Repeat,
    Residual,
)

#: float16 ConvTranspose1d -> BN (mean ~5e3 stds) -> ConvTranspose1d -> BN: folds measured beyond the rule
SEED_647855096 = ModelSpec(in_shape=(3, 3), dtype='float16', mode='eval', seed=0, outputs='last', blocks=(
    ConvNorm(conv=ConvSpec(dims=1, cin=3, cout=6, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=False, padding_mode='zeros', transposed=True, output_padding=0, functional=False), norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=30.0, log_var=(-5.0, 0.0, ), gamma='positive', beta_scale=0.0), through=None, act=False),
    ConvNorm(conv=ConvSpec(dims=1, cin=6, cout=6, kernel=3, stride=1, padding=0, dilation=1, groups=1, bias=False, padding_mode='zeros', transposed=True, output_padding=0, functional=False), norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(-5.0, 0.0, ), gamma='positive', beta_scale=0.0), through=None, act=False),
))

#: float32 Conv3d -> BN (mean ~20 stds) -> avgpool -> cat -> batch-statistics BN: beyond the rule at batch 5
SEED_934055385_CHUNK_6 = ModelSpec(in_shape=(1, 4, 3, 2), dtype='float32', mode='eval', seed=573, outputs='last', blocks=(
    ConvNorm(conv=ConvSpec(dims=3, cin=1, cout=16, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode='zeros', transposed=False, output_padding=0, functional=False), norm=NormSpec(kind='module', affine=True, track=True, eps=1e-05, mean_scale=30.0, log_var=(-0.0, 1.5, ), gamma='mixed', beta_scale=0.0), through='avgpool', act=False),
    Fork(branches=((), (ConvNorm(conv=ConvSpec(dims=3, cin=16, cout=1, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode='zeros', transposed=False, output_padding=0, functional=False), norm=None, through=None, act=False), ), (), ), merge='cat', norm=NormSpec(kind='module', affine=False, track=False, eps=0.1, mean_scale=0.0, log_var=(0.0, 0.0, ), gamma='positive', beta_scale=0.0)),
))

#: float32 BN subclass (mean ~1e3 stds) after a grouped reflect-padded conv: a measured cancellation refusal
SEED_934055385_CHUNK_7 = ModelSpec(in_shape=(1, 3, 2), dtype='float32', mode='eval', seed=356, outputs='last', blocks=(
    Residual(conv1=ConvSpec(dims=2, cin=1, cout=15, kernel=3, stride=1, padding=2, dilation=2, groups=1, bias=True, padding_mode='zeros', transposed=False, output_padding=0, functional=False), norm1=NormSpec(kind='module', affine=False, track=False, eps=0.1, mean_scale=0.0, log_var=(0.27, 2.03, ), gamma='positive', beta_scale=0.0), conv2=ConvSpec(dims=2, cin=15, cout=1, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=False, padding_mode='zeros', transposed=False, output_padding=0, functional=False), norm2=NormSpec(kind='functional', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(1.54, 2.99, ), gamma='positive', beta_scale=0.0)),
    NormFanout(norm=NormSpec(kind='subclass', affine=False, track=True, eps=0.001, mean_scale=1000.0, log_var=(0.0, 1.37, ), gamma='positive', beta_scale=0.5), a=ConvSpec(dims=2, cin=1, cout=8, kernel=1, stride=1, padding=0, dilation=2, groups=1, bias=False, padding_mode='replicate', transposed=False, output_padding=0, functional=False), b=ConvSpec(dims=2, cin=1, cout=8, kernel=3, stride=1, padding=2, dilation=2, groups=1, bias=False, padding_mode='zeros', transposed=False, output_padding=0, functional=False)),
    ConvNorm(conv=ConvSpec(dims=2, cin=8, cout=16, kernel=2, stride=2, padding=0, dilation=1, groups=8, bias=True, padding_mode='reflect', transposed=False, output_padding=0, functional=False), norm=NormSpec(kind='subclass', affine=True, track=True, eps=0.001, mean_scale=1000.0, log_var=(-0.08, 1.87, ), gamma='mixed', beta_scale=0.0), through=None, act=False),
    Residual(conv1=ConvSpec(dims=2, cin=16, cout=2, kernel=3, stride=1, padding=2, dilation=2, groups=1, bias=False, padding_mode='replicate', transposed=False, output_padding=0, functional=False), norm1=NormSpec(kind='subclass', affine=True, track=True, eps=0.001, mean_scale=30.0, log_var=(-2.14, -0.0, ), gamma='negative', beta_scale=5.0), conv2=ConvSpec(dims=2, cin=2, cout=16, kernel=1, stride=1, padding=0, dilation=1, groups=2, bias=False, padding_mode='reflect', transposed=False, output_padding=0, functional=False), norm2=NormSpec(kind='module', affine=False, track=False, eps=0.1, mean_scale=0.0, log_var=(-1.38, 0.33, ), gamma='negative', beta_scale=0.0)),
))

#: float32 Conv3d -> functional BN (mean ~1e3, var 10^-3.35..1, eps 0.1) in a residual block, then a
#: Linear over 40 positions: the fold at risk is within the rule on normal inputs and at its edge on
#: U(0, 255) ones (0.6-1.1 of the allowance from draw to draw)
SEED_934055385_CHUNK_9 = ModelSpec(in_shape=(2, 2, 2, 5, ), dtype='float32', mode='eval', seed=225, outputs='all', blocks=(
    Residual(conv1=ConvSpec(dims=3, cin=2, cout=13, kernel=3, stride=1, padding=2, dilation=2, groups=1, bias=False, padding_mode='zeros', transposed=False, output_padding=0, functional=False), norm1=NormSpec(kind='module', affine=False, track=True, eps=0.001, mean_scale=0.5, log_var=(-1.1, 2.85, ), gamma='positive', beta_scale=0.0), conv2=ConvSpec(dims=3, cin=13, cout=2, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True, padding_mode='reflect', transposed=False, output_padding=0, functional=False), norm2=NormSpec(kind='functional', affine=False, track=True, eps=0.1, mean_scale=1000.0, log_var=(-3.35, 0.0, ), gamma='positive', beta_scale=0.0)),
    LinearNorm(linear=LinearSpec(fin=40, fout=10, bias=True), norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(0.0, 0.0, ), gamma='positive', beta_scale=0.0), flatten=True, act=False),
    AfterAct(norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(0.0, 0.0, ), gamma='positive', beta_scale=0.0), act=False),
    Repeat(index=2, block=AfterAct(norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(0.0, 0.0, ), gamma='positive', beta_scale=0.0), act=False)),
    Repeat(index=2, block=AfterAct(norm=NormSpec(kind='module', affine=False, track=True, eps=1e-05, mean_scale=0.0, log_var=(0.0, 0.0, ), gamma='positive', beta_scale=0.0), act=False)),
))

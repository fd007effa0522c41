"""Pure functions of the quantization methods: statistics and weights in, ranges and factors out."""

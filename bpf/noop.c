// SPDX-License-Identifier: GPL-2.0
/* Do-nothing programs of each hook: the baseline that per-packet benchmarks compare against. */
#include "common.h"

SEC("tc")
int noop_tc(struct __sk_buff *skb)
{
	return TC_PASS_ON;
}

SEC("xdp")
int noop_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";

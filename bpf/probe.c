// SPDX-License-Identifier: GPL-2.0
/* Kernel feature probes run once by user space with BPF_PROG_TEST_RUN; each returns 0 when the feature works. */
#include "common.h"

/* Does bpf_l4_csum_replace accept BPF_F_IPV6 (Linux 6.16)? Older kernels return -EINVAL. */
SEC("tc")
int probe_csum_ipv6(struct __sk_buff *skb)
{
	return bpf_l4_csum_replace(skb, sizeof(struct ethhdr), 0, 0,
				   BPF_F_PSEUDO_HDR | BPF_F_IPV6);
}

char LICENSE[] SEC("license") = "GPL";

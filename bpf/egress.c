// SPDX-License-Identifier: GPL-2.0
/* ipv6-hp egress: replies to the global probe address leave addressed to the link-local prober. */
#include "ipv6_hp.h"

SEC("tc")
int ipv6_hp_egress(struct __sk_buff *skb)
{
	return ipv6_hp_rewrite(skb, HP_DST, (const struct in6_addr *)&global_addr,
			       (const struct in6_addr *)&link_local_addr);
}

char LICENSE[] SEC("license") = "GPL";

// SPDX-License-Identifier: GPL-2.0
/* ipv6-hp ingress: health probes from the link-local source arrive as from the global address. */
#include "ipv6_hp.h"

SEC("tc")
int ipv6_hp_ingress(struct __sk_buff *skb)
{
	return ipv6_hp_rewrite(skb, HP_SRC, (const struct in6_addr *)&link_local_addr,
			       (const struct in6_addr *)&global_addr);
}

char LICENSE[] SEC("license") = "GPL";

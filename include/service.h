/* The service tables every load-balancing datapath shares (clusterip, lb, xdp-lb), read by
 * src/service.rs: a service VIP:PORT (the key) owns `count` backend slots starting at
 * `base`. A changed backend list is written to fresh slots and then swapped in with one
 * update of the service's value, so a lookup never sees a half-written list.
 * Addresses and ports are in network order; IPv4 uses addr[0]. */
#pragma once

/* An address and port of one family; pad zeroed so equal endpoints hash equal. */
struct service_endpoint {
	__u32 addr[4];
	__be16 port;
	__u8 family; /* AF_INET (2) or AF_INET6 (10) */
	__u8 pad;
};

struct service_range {
	__u32 base;
	__u32 count;
};

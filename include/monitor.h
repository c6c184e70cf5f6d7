/* Shared between bpf/monitor.c and src/monitor.rs: the flow table's key and counters. */
#pragma once

#include "parse.h"

enum flow_direction {
	FLOW_INGRESS = 0,
	FLOW_EGRESS = 1,
};

/* One flow as seen on one side of the interface. Every byte is set (pad included) so equal
 * flows hash equal. Ports are in host order; for ICMP, sport is the type and dport the code. */
struct flow_key {
	__u8 direction; /* enum flow_direction */
	__u8 family;    /* AF_INET (2) or AF_INET6 (10) */
	__u8 proto;     /* IPPROTO_* of the upper layer */
	__u8 pad;
	__u16 sport;
	__u16 dport;
	__u32 src[4]; /* IPv4 in src[0], network order */
	__u32 dst[4];
};

struct flow_counters {
	__u64 packets;
	__u64 bytes;
};

#define MONITOR_MAX_FLOWS 65536

/* Constants every ebpf-net BPF program needs that vmlinux.h lacks (they are #defines in uapi). */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_ALEN 6
#define AF_INET 2
#define AF_INET6 10
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8

/* IPv6 next-header values (include/net/ipv6.h) */
#define NEXTHDR_HOP 0
#define NEXTHDR_TCP 6
#define NEXTHDR_UDP 17
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_ICMP 58
#define NEXTHDR_NONE 59
#define NEXTHDR_DEST 60

/*
 * "Not mine, carry on": TC_ACT_UNSPEC is TCX_NEXT for tcx links and "next filter" for
 * cls_bpf in direct-action mode. Returning TC_ACT_OK instead would skip every program
 * after ours, including a Cilium datapath attached to the same hook.
 */
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7
#define TC_PASS_ON TC_ACT_UNSPEC

#ifndef offsetof
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif

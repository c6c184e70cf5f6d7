/* The flood detector of the load balancers (lb, xdp-lb), after Katran's is_under_flood: new
 * flows per second per CPU above a rate mean a flood; then a new flow is only made for a
 * client that sends its first packet again 0.2-10 s later (a retransmitted SYN, a repeated
 * datagram), so spoofed one-shot packets take no state and no source port. */
#pragma once

#include "common.h"

#define FLOOD_SEEN_SLOTS 65536
#define FLOOD_RETRY_MIN_MS 200
#define FLOOD_RETRY_MAX_MS 10000

/* Per CPU, key 0, of a PERCPU_ARRAY: the current one-second window. */
struct flood_window {
	__u64 start; /* ns */
	__u64 new_flows;
};

/* Counts a new flow in this CPU's window (`windows`, a one-entry PERCPU_ARRAY): whether it is
 * one more than `rate` a second allows. `rate` 0: never. */
static __always_inline bool flood_over_rate(void *windows, __u32 rate, __u64 now)
{
	struct flood_window *window;
	__u32 zero = 0;

	if (!rate)
		return false;
	window = bpf_map_lookup_elem(windows, &zero);
	if (!window)
		return false;
	if (now - window->start > 1000000000ULL) {
		window->start = now;
		window->new_flows = 0;
	}
	return ++window->new_flows > rate;
}

/* Under flood: whether the client with flow hash `hash` sent its first packet 0.2-10 s ago
 * already; else remembers this one. `seen` is an ARRAY of FLOOD_SEEN_SLOTS __u64 holding
 * hash << 32 | milliseconds, by hash % slots. */
static __always_inline bool flood_asked_again(void *seen_map, __u32 hash, __u64 now)
{
	__u32 index = hash % FLOOD_SEEN_SLOTS;
	__u32 now_ms = (__u32)(now / 1000000);
	__u64 *seen = bpf_map_lookup_elem(seen_map, &index);
	__u32 age;

	if (!seen)
		return false;
	if ((__u32)(*seen >> 32) == hash) {
		age = now_ms - (__u32)*seen;
		if (age >= FLOOD_RETRY_MIN_MS && age < FLOOD_RETRY_MAX_MS) {
			*seen = 0;
			return true;
		}
		/* a duplicate at once is not a retransmission: keep the first time */
		if (age < FLOOD_RETRY_MIN_MS)
			return false;
	}
	*seen = ((__u64)hash << 32) | now_ms;
	return false;
}

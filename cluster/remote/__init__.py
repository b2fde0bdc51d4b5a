"""Programs vcluster ships to nodes and containers and runs there with their own Python (as old
as 3.8): the supervisor, the collective check, the relay, the multicast probe and the serving
package; `registry` lists them and reads them out for sending."""

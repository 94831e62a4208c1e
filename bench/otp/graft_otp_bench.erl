%% graft_otp_bench: the Erlang/OTP side of Graft's side-by-side benchmarks.
%%
%% Started by run.sh as
%%   erl -noshell -pa EBIN -run graft_otp_bench main full|smoke WORKDIR SRCDIR [ONLY]
%% It prints one JSON object per line on stdout (first a "meta" line) and
%% anything meant for people on stderr.  See README.md for what each
%% workload measures.
-module(graft_otp_bench).

-export([main/1]).

-define(COUNTER, bench_counter).
-define(HOT, bench_hot).
-define(LIVE, bench_live).

%% =====================================================================
%% Entry point
%% =====================================================================

main([Mode, WorkDir, SrcDir | Rest]) ->
    Only = case Rest of
               [] -> all;
               [""] -> all;
               [O | _] -> string:lexemes(O, ",")
           end,
    Cfg = config(Mode),
    try
        run(Cfg#{work_dir => WorkDir, src_dir => SrcDir, only => Only}),
        halt(0)
    catch
        Class:Reason:Stack ->
            log("FAILED: ~p:~p~n~p", [Class, Reason, Stack]),
            halt(1)
    end;
main(Args) ->
    log("usage: graft_otp_bench main full|smoke WORKDIR SRCDIR [ONLY], got ~p", [Args]),
    halt(2).

config("full") ->
    #{smoke => false,
      spawn_idle => [{10000, 5}, {100000, 3}],          % {N, runs}
      call_host => {100000, 5},                         % {M, runs}
      call_proc => {100000, 5},
      reload => [{10000, 5}, {100000, 3}],              % {N, runs}
      reload_empty => {200, 10},                        % {iterations, warmup}
      edit_to_live => {50, 10}};                        % {saves, poll ms}
config("smoke") ->
    #{smoke => true,
      spawn_idle => [{100, 2}, {1000, 2}],
      call_host => {1000, 2},
      call_proc => {1000, 2},
      reload => [{100, 2}, {1000, 2}],
      reload_empty => {10, 2},
      edit_to_live => {5, 10}}.

run(Cfg) ->
    Workloads = [{"spawn_idle", fun spawn_idle/1},
                 {"call_host", fun call_host/1},
                 {"call_proc", fun call_proc/1},
                 {"reload", fun reload/1},
                 {"reload_empty", fun reload_empty/1},
                 {"edit_to_live", fun edit_to_live/1}],
    case maps:get(only, Cfg) of
        all -> ok;
        Only -> [error({unknown_workload, W}) || W <- Only,
                                                 not lists:keymember(W, 1, Workloads)]
    end,
    meta(Cfg),
    lists:foreach(
      fun({Name, Fun}) ->
              case selected(Name, Cfg) of
                  true ->
                      log("[otp-bench] ~s ...", [Name]),
                      T0 = now_ns(),
                      Fun(Cfg),
                      log("[otp-bench] ~s done in ~.1f s", [Name, (now_ns() - T0) / 1.0e9]);
                  false ->
                      ok
              end
      end, Workloads).

selected(_Name, #{only := all}) -> true;
selected(Name, #{only := Only}) -> lists:member(Name, Only).

meta(#{smoke := Smoke}) ->
    Load = loadavg_1m(),
    case is_float(Load) andalso Load > 0.5 of
        true -> log("[otp-bench] WARNING: 1-minute load average is ~.2f: other work is "
                    "running on this machine, expect noisy figures", [Load]);
        false -> ok
    end,
    emit([{workload, <<"meta">>},
          {otp_release, list_to_binary(erlang:system_info(otp_release))},
          {erts, list_to_binary(erlang:system_info(version))},
          {schedulers, erlang:system_info(schedulers)},
          {schedulers_online, erlang:system_info(schedulers_online)},
          {logical_processors, erlang:system_info(logical_processors_available)},
          {word_size, erlang:system_info({wordsize, external})},
          {process_limit, erlang:system_info(process_limit)},
          {smoke, Smoke},
          {loadavg_1m, Load},
          {stat, <<"median">>}]).

%% First field of /proc/loadavg (null where there is none).
loadavg_1m() ->
    case file:open("/proc/loadavg", [read]) of
        {ok, F} ->
            Line = io:get_line(F, ""),
            ok = file:close(F),
            try list_to_float(hd(string:lexemes(Line, " ")))
            catch _:_ -> null
            end;
        {error, _} ->
            null
    end.

%% =====================================================================
%% a. spawn_idle
%% =====================================================================

spawn_idle(#{spawn_idle := Sizes}) ->
    lists:foreach(fun({N, Runs}) -> spawn_idle(N, Runs) end, Sizes).

spawn_idle(N, Runs) ->
    Results = [in_fresh_process(fun() -> spawn_idle_once(N) end)
               || _ <- lists:seq(1, Runs)],
    TotalNs = [maps:get(total_ns, R) || R <- Results],
    MemPer = [maps:get(mem_per_proc, R) || R <- Results],
    MemUsedPer = [maps:get(mem_used_per_proc, R) || R <- Results],
    ProcInfo = [maps:get(proc_info_memory, R) || R <- Results],
    emit([{workload, <<"spawn_idle">>},
          {n, N},
          {runs, Runs},
          {start_fun, <<"gen_server:start/3">>},
          {total_us, us(median(TotalNs))},
          {total_us_best, us(lists:min(TotalNs))},
          {per_op_ns, median(TotalNs) / N},
          {per_op_ns_best, lists:min(TotalNs) / N},
          {mem_per_proc_bytes, median(MemPer)},
          {mem_used_per_proc_bytes, median(MemUsedPer)},
          {proc_info_memory_bytes, median(ProcInfo)}]).

spawn_idle_once(N) ->
    BaseCount = erlang:system_info(process_count),
    erlang:garbage_collect(),
    Before = erlang:memory(processes),
    BeforeUsed = erlang:memory(processes_used),
    SelfBefore = self_memory(),
    T0 = now_ns(),
    Pids = start_counters(N),
    T1 = now_ns(),
    %% Memory: GC every new process and ourselves, then take the growth of
    %% erlang:memory(processes) minus our own growth (the pid list lives on
    %% our heap).
    lists:foreach(fun(P) -> erlang:garbage_collect(P) end, Pids),
    erlang:garbage_collect(),
    After = erlang:memory(processes),
    AfterUsed = erlang:memory(processes_used),
    SelfGrowth = self_memory() - SelfBefore,
    {memory, OneMem} = erlang:process_info(lists:nth(N div 2 + 1, Pids), memory),
    N = erlang:system_info(process_count) - BaseCount,
    kill_all(Pids, BaseCount),
    #{total_ns => T1 - T0,
      mem_per_proc => (After - Before - SelfGrowth) / N,
      mem_used_per_proc => (AfterUsed - BeforeUsed - SelfGrowth) / N,
      proc_info_memory => OneMem}.

start_counters(N) ->
    start_counters(N, []).

start_counters(0, Acc) ->
    lists:reverse(Acc);
start_counters(K, Acc) ->
    {ok, Pid} = ?COUNTER:start(),
    start_counters(K - 1, [Pid | Acc]).

%% =====================================================================
%% b. call_host: plain process -> gen_server:call -> counter
%% =====================================================================

call_host(#{call_host := {M, Runs}}) ->
    Results = [in_fresh_process(fun() -> call_host_once(M) end)
               || _ <- lists:seq(1, Runs)],
    emit_calls(<<"call_host">>, M, Runs, Results).

call_host_once(M) ->
    {ok, Counter} = ?COUNTER:start(),
    Warm = 1000,
    Warm = call_loop(Counter, Warm, undefined),
    T0 = now_ns(),
    Last = call_loop(Counter, M, undefined),
    T1 = now_ns(),
    Expected = Warm + M,
    Expected = Last,
    gen_server:stop(Counter),
    T1 - T0.

call_loop(_Pid, 0, Last) ->
    Last;
call_loop(Pid, K, _Last) ->
    call_loop(Pid, K - 1, gen_server:call(Pid, inc)).

%% =====================================================================
%% c. call_proc: gen_server -> (inside handle_call) gen_server:call -> counter
%% =====================================================================

call_proc(#{call_proc := {M, Runs}}) ->
    Results = [in_fresh_process(fun() -> call_proc_once(M) end)
               || _ <- lists:seq(1, Runs)],
    emit_calls(<<"call_proc">>, M, Runs, Results).

call_proc_once(M) ->
    {ok, Counter} = ?COUNTER:start(),
    {ok, Caller} = bench_caller:start(),
    Warm = 1000,
    Warm = bench_caller:call_loop(Caller, Counter, Warm),
    T0 = now_ns(),
    Last = bench_caller:call_loop(Caller, Counter, M),
    T1 = now_ns(),
    Expected = Warm + M,
    Expected = Last,
    gen_server:stop(Caller),
    gen_server:stop(Counter),
    T1 - T0.

emit_calls(Name, M, Runs, TotalNs) ->
    emit([{workload, Name},
          {m, M},
          {runs, Runs},
          {total_us, us(median(TotalNs))},
          {total_us_best, us(lists:min(TotalNs))},
          {per_op_ns, median(TotalNs) / M},
          {per_op_ns_best, lists:min(TotalNs) / M}]).

%% =====================================================================
%% d. reload: upgrade N live counter processes from v1 to v2
%% =====================================================================

reload(#{reload := Sizes, work_dir := WorkDir}) ->
    {ok, V1} = file:read_file(code:which(?COUNTER)),
    V1Path = code:which(?COUNTER),
    V2Path = filename:join([WorkDir, "ebin_v2", "bench_counter.beam"]),
    {ok, V2} = file:read_file(V2Path),
    Bins = #{v1 => {V1Path, V1}, v2 => {V2Path, V2}},
    lists:foreach(
      fun({N, Runs}) ->
              lists:foreach(fun(Mode) -> reload(Mode, N, Runs, Bins) end,
                            [sequential, parallel])
      end, Sizes).

reload(Mode, N, Runs, Bins) ->
    Results = [in_fresh_process(fun() -> reload_once(Mode, N, Bins) end)
               || _ <- lists:seq(1, Runs)],
    Total = [maps:get(total_ns, R) || R <- Results],
    Med = fun(K) -> us(median([maps:get(K, R) || R <- Results])) end,
    Name = case Mode of sequential -> <<"reload_seq">>; parallel -> <<"reload_par">> end,
    Extra = case Mode of
                sequential -> [{change_code_us, Med(change_code_ns)},
                               {resume_us, Med(resume_ns)}];
                parallel -> []
            end,
    emit([{workload, Name},
          {n, N},
          {runs, Runs},
          {workers, maps:get(workers, hd(Results))},
          {total_us, us(median(Total))},
          {total_us_best, us(lists:min(Total))},
          {per_proc_ns, median(Total) / N},
          {per_proc_ns_best, lists:min(Total) / N},
          {suspend_us, Med(suspend_ns)},
          {load_us, Med(load_ns)},
          {change_resume_us, Med(change_resume_ns)}]
         ++ Extra ++
         [{verified_sample, maps:get(verified, hd(Results))}]).

reload_once(Mode, N, #{v1 := {V1Path, V1}, v2 := {V2Path, V2}}) ->
    BaseCount = erlang:system_info(process_count),
    %% Make v1 the current code with no old code around.
    load_clean(V1Path, V1),
    [1] = vsn(?COUNTER),
    Pids = start_counters(N),
    %% Give part of a sample a non-zero count so "state kept" is checkable.
    Sample = sample(Pids, 1000),
    Expected0 = prepare_sample(Sample),
    OldVsn = 1,
    true = code:soft_purge(?COUNTER),        % no old code before the load
    R = case Mode of
            sequential -> reload_sequential(Pids, OldVsn, V2Path, V2);
            parallel -> reload_parallel(Pids, OldVsn, V2Path, V2)
        end,
    Verified = verify(Pids, BaseCount, Expected0),
    kill_all(Pids, BaseCount),
    R#{verified => Verified}.

%% What release_handler does for {update, Mod, {advanced, Extra}}:
%% {suspend,[Mod]}, {load,Mod}, {code_change,up,[{Mod,Extra}]}, {resume,[Mod]},
%% each step one process at a time.
reload_sequential(Pids, OldVsn, V2Path, V2) ->
    T0 = now_ns(),
    lists:foreach(fun(P) -> ok = sys:suspend(P) end, Pids),
    T1 = now_ns(),
    {module, ?COUNTER} = code:load_binary(?COUNTER, V2Path, V2),
    T2 = now_ns(),
    lists:foreach(fun(P) -> ok = sys:change_code(P, ?COUNTER, OldVsn, []) end, Pids),
    T3 = now_ns(),
    lists:foreach(fun(P) -> ok = sys:resume(P) end, Pids),
    T4 = now_ns(),
    #{workers => 1,
      total_ns => T4 - T0, suspend_ns => T1 - T0, load_ns => T2 - T1,
      change_code_ns => T3 - T2, resume_ns => T4 - T3,
      change_resume_ns => T4 - T2}.

%% Same three phases, but the processes are split across one worker per
%% online scheduler: all workers suspend their share; when every process is
%% suspended the module is loaded once; then each worker runs
%% sys:change_code and sys:resume over its share.  Workers are spawned and
%% given their share before the timer starts.
reload_parallel(Pids, OldVsn, V2Path, V2) ->
    W = erlang:system_info(schedulers_online),
    Self = self(),
    Workers = [spawn_link(fun() -> reload_worker(Self, Share, OldVsn) end)
               || Share <- split(Pids, W)],
    T0 = now_ns(),
    [Wk ! suspend || Wk <- Workers],
    [receive {suspended, Wk} -> ok end || Wk <- Workers],
    T1 = now_ns(),
    {module, ?COUNTER} = code:load_binary(?COUNTER, V2Path, V2),
    T2 = now_ns(),
    [Wk ! change || Wk <- Workers],
    [receive {changed, Wk} -> ok end || Wk <- Workers],
    T3 = now_ns(),
    #{workers => W,
      total_ns => T3 - T0, suspend_ns => T1 - T0, load_ns => T2 - T1,
      change_resume_ns => T3 - T2}.

reload_worker(Parent, Share, OldVsn) ->
    receive suspend -> ok end,
    lists:foreach(fun(P) -> ok = sys:suspend(P) end, Share),
    Parent ! {suspended, self()},
    receive change -> ok end,
    lists:foreach(fun(P) -> ok = sys:change_code(P, ?COUNTER, OldVsn, []) end, Share),
    lists:foreach(fun(P) -> ok = sys:resume(P) end, Share),
    Parent ! {changed, self()}.

%% Before the reload: every other sampled process gets one `inc` (count 1).
prepare_sample(Sample) ->
    {Expected, _} =
        lists:mapfoldl(
          fun(P, I) when I rem 2 =:= 0 -> 1 = ?COUNTER:inc(P), {{P, 1}, I + 1};
             (P, I) -> {{P, 0}, I + 1}
          end, 0, Sample),
    Expected.

%% After the reload: v2 is current, no process needs the old code, every
%% process is alive, and sampled processes kept their count, gained
%% step => 10 and now add 10 per inc.
verify(Pids, BaseCount, Expected) ->
    check([2] =:= vsn(?COUNTER), {wrong_vsn_after_reload, vsn(?COUNTER)}),
    check(length(Pids) =:= erlang:system_info(process_count) - BaseCount,
          processes_lost),
    lists:foreach(
      fun({P, C}) ->
              State = sys:get_state(P),
              check(State =:= #{count => C, step => 10}, {bad_state, P, State}),
              Reply = gen_server:call(P, inc),
              check(Reply =:= C + 10, {bad_reply, P, C, Reply})
      end, Expected),
    check(code:soft_purge(?COUNTER), old_code_still_in_use),
    length(Expected).

check(true, _What) -> ok;
check(false, What) -> error({verification_failed, What}).

load_clean(Path, Bin) ->
    true = code:soft_purge(?COUNTER),
    {module, ?COUNTER} = code:load_binary(?COUNTER, Path, Bin),
    true = code:soft_purge(?COUNTER),
    ok.

vsn(Mod) ->
    proplists:get_value(vsn, Mod:module_info(attributes)).

%% =====================================================================
%% e. reload_empty: compile:file + load, no processes
%% =====================================================================

reload_empty(#{reload_empty := {Iters, Warmup}, src_dir := SrcDir, work_dir := WorkDir}) ->
    Template = read_template(SrcDir),
    Srcs = {module_source(Template, ?HOT, 1), module_source(Template, ?HOT, 2)},
    Dir = filename:join(WorkDir, "hot"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    File = filename:join(Dir, atom_to_list(?HOT) ++ ".erl"),
    Samples =
        [begin
             V = 1 + (I rem 2),
             ok = file:write_file(File, element(V, Srcs)),   % untimed
             T0 = now_ns(),
             {ok, ?HOT, Beam} = compile:file(File, [binary, return_errors]),
             T1 = now_ns(),
             true = code:soft_purge(?HOT),
             T2 = now_ns(),
             {module, ?HOT} = code:load_binary(?HOT, File, Beam),
             T3 = now_ns(),
             check(?HOT:value() =:= V, {hot_value, V}),
             {T1 - T0, T2 - T1, T3 - T2, byte_size(Beam)}
         end || I <- lists:seq(1, Warmup + Iters)],
    Measured = lists:nthtail(Warmup, Samples),
    Compile = [C || {C, _, _, _} <- Measured],
    Purge = [P || {_, P, _, _} <- Measured],
    Load = [L || {_, _, L, _} <- Measured],
    Total = [C + P + L || {C, P, L, _} <- Measured],
    {_, _, _, BeamBytes} = hd(Measured),
    true = code:soft_purge(?HOT),
    true = code:delete(?HOT),
    true = code:soft_purge(?HOT),
    emit([{workload, <<"reload_empty">>},
          {iterations, Iters},
          {compile_fun, <<"compile:file/2">>},
          {compile_us, us(median(Compile))},
          {compile_us_p99, us(percentile(Compile, 0.99))},
          {purge_us, us(median(Purge))},
          {load_us, us(median(Load))},
          {load_us_p99, us(percentile(Load, 0.99))},
          {total_us, us(median(Total))},
          {source_bytes, length(element(1, Srcs))},
          {beam_bytes, BeamBytes}]).

read_template(SrcDir) ->
    {ok, Bin} = file:read_file(filename:join(SrcDir, "bench_hot.erl.tmpl")),
    unicode:characters_to_list(Bin).

module_source(Template, Mod, Value) ->
    S1 = string:replace(Template, "@MODULE@", atom_to_list(Mod), all),
    S2 = string:replace(S1, "@VALUE@", integer_to_list(Value), all),
    unicode:characters_to_list(S2).

%% =====================================================================
%% f. edit_to_live: save a source file, wait until the new code answers
%% =====================================================================

edit_to_live(#{edit_to_live := {Saves, PollMs}, work_dir := WorkDir, src_dir := SrcDir}) ->
    Template = read_template(SrcDir),
    Dir = filename:join(WorkDir, "live"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    File = filename:join(Dir, atom_to_list(?LIVE) ++ ".erl"),
    save(File, module_source(Template, ?LIVE, 0)),
    {ok, Watcher} = bench_watcher:start(File, PollMs),
    wait_value(0, now_ns() + 10000000000),
    Lat = [begin
               timer:sleep(19 + rand:uniform(31)),      % 20..50 ms between saves
               Src = module_source(Template, ?LIVE, I),
               T0 = now_ns(),
               save(File, Src),
               wait_value(I, T0 + 10000000000),
               now_ns() - T0
           end || I <- lists:seq(1, Saves)],
    #{reloads := Reloads, errors := Errors, polls := Polls} = bench_watcher:stats(Watcher),
    bench_watcher:stop(Watcher),
    check(Errors =:= 0, {watcher_compile_errors, Errors}),
    check(length(Reloads) =:= Saves + 1, {reload_count, length(Reloads), Saves + 1}),
    %% drop the initial load of version 0
    Measured = tl(Reloads),
    true = code:soft_purge(?LIVE),
    true = code:delete(?LIVE),
    true = code:soft_purge(?LIVE),
    emit([{workload, <<"edit_to_live">>},
          {saves, Saves},
          {poll_ms, PollMs},
          {p50_us, us(percentile(Lat, 0.50))},
          {p99_us, us(percentile(Lat, 0.99))},
          {max_us, us(lists:max(Lat))},
          {min_us, us(lists:min(Lat))},
          {mean_us, us(lists:sum(Lat) / length(Lat))},
          {watcher_compile_us, median([C || {C, _} <- Measured])},
          {watcher_load_us, median([L || {_, L} <- Measured])},
          {watcher_polls, Polls}]).

%% Like an editor's atomic save: write a temp file, rename over the source.
save(File, Src) ->
    Tmp = File ++ ".tmp",
    ok = file:write_file(Tmp, Src),
    ok = file:rename(Tmp, File).

%% Busy-poll the module function until it serves Want.
wait_value(Want, Deadline) ->
    Got = try ?LIVE:value() catch error:undef -> undefined end,
    case Got of
        Want -> ok;
        _ ->
            case now_ns() > Deadline of
                true -> error({edit_to_live_timeout, Want, Got});
                false -> wait_value(Want, Deadline)
            end
    end.

%% =====================================================================
%% Helpers
%% =====================================================================

%% Run Fun in a new process (small, clean heap); return its result or
%% re-raise its failure here.
in_fresh_process(Fun) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({ok, Fun()}) end),
    receive
        {'DOWN', Ref, process, Pid, {ok, Result}} -> Result;
        {'DOWN', Ref, process, Pid, Reason} -> error({run_failed, Reason})
    end.

kill_all(Pids, BaseCount) ->
    lists:foreach(fun(P) -> exit(P, kill) end, Pids),
    wait_process_count(BaseCount, 2000).

wait_process_count(_Base, 0) ->
    error(processes_did_not_exit);
wait_process_count(Base, Tries) ->
    case erlang:system_info(process_count) =< Base of
        true -> ok;
        false -> timer:sleep(5), wait_process_count(Base, Tries - 1)
    end.

self_memory() ->
    {memory, M} = erlang:process_info(self(), memory),
    M.

%% Up to K processes, evenly spread over the list, first and last included.
sample(Pids, K) when length(Pids) =< K ->
    Pids;
sample(Pids, K) ->
    N = length(Pids),
    T = list_to_tuple(Pids),
    lists:usort([element(1 + (I * (N - 1)) div (K - 1), T) || I <- lists:seq(0, K - 1)]).

%% Split a list into W nearly equal chunks.
split(List, W) ->
    Len = length(List),
    Base = Len div W,
    Extra = Len rem W,
    split(List, W, Base, Extra, []).

split(_List, 0, _Base, _Extra, Acc) ->
    lists:reverse(Acc);
split(List, K, Base, Extra, Acc) ->
    Size = Base + (case Extra > 0 of true -> 1; false -> 0 end),
    {Chunk, Rest} = lists:split(Size, List),
    split(Rest, K - 1, Base, max(Extra - 1, 0), [Chunk | Acc]).

now_ns() -> erlang:monotonic_time(nanosecond).

us(Ns) -> Ns / 1000.

%% Nearest-rank percentile (P in 0..1); median = percentile 0.5, which for
%% an even count is the lower of the two middle values.
percentile(List, P) ->
    Sorted = lists:sort(List),
    N = length(Sorted),
    Rank = max(1, ceil(P * N)),
    lists:nth(Rank, Sorted).

median(List) -> percentile(List, 0.5).

log(Fmt, Args) ->
    io:format(standard_error, Fmt ++ "~n", Args).

%% ---------------------------------------------------------------------
%% Minimal JSON encoder: emit([{Key, Value}]) prints one object per line.
%% Values: integer, float, true/false/null, binary (string), list of values.

emit(Pairs) ->
    Line = ["{", lists:join(",", [[json_str(atom_to_binary(K)), ":", json(V)]
                                  || {K, V} <- Pairs]), "}\n"],
    io:put_chars(standard_io, Line).

json(true) -> "true";
json(false) -> "false";
json(null) -> "null";
json(I) when is_integer(I) -> integer_to_list(I);
json(F) when is_float(F) -> float_to_list(F, [{decimals, 3}, compact]);
json(B) when is_binary(B) -> json_str(B);
json(A) when is_atom(A) -> json_str(atom_to_binary(A));
json(L) when is_list(L) -> ["[", lists:join(",", [json(V) || V <- L]), "]"].

json_str(B) ->
    [$", [esc(C) || <<C/utf8>> <= B], $"].

esc($") -> "\\\"";
esc($\\) -> "\\\\";
esc($\n) -> "\\n";
esc(C) when C < 16#20 -> io_lib:format("\\u~4.16.0b", [C]);
esc(C) -> <<C/utf8>>.
